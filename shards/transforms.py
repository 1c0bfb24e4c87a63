"""Image decoding and preprocessing with PIL and torch only (torchvision does not import beside torch 2.13 here).

Shapes: N images, S the output side; tensors are channels-first, uint8 (0..255) or normalized float32.

The transform is the usual evaluation one (resize the shorter side to S with bicubic filtering, center crop
S x S), plus an optional horizontal flip decided by a caller's RNG so augmentation stays reproducible.
Normalization is separate (:func:`normalize_pixels`): the stream's workers hand uint8 pixels over (a quarter of the
bytes through worker IPC and host-to-device copies) and the training step normalizes them on its device.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 40_000_000
"""Images whose header claims more pixels are refused before decoding (decompression-bomb guard)."""


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image of an acceptable size."""


def decode_image(data: bytes, size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (JPEG, or anything PIL reads) to an RGB image; raise :class:`ImageDecodeError`.

    With ``size``, a JPEG may be decoded at a reduced scale that still keeps both sides >= ``size``
    (PIL's draft mode: much faster for large photos, and the shorter side is resized to ``size`` anyway).
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"undecodable image ({type(e).__name__}: {e})") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the central ``size`` x ``size`` square."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    width, height = img.size
    pixels_HWC = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels_HWC.permute(2, 0, 1).contiguous()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float (3, H, W) tensor in [0, 1]."""
    return to_uint8(img).float().div_(255.0)


def normalize_pixels(
    pixels: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
    std: Sequence[float] | torch.Tensor = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> ``(pixels / 255 - mean) / std`` in ``dtype``, on the pixels' device.

    Computed in float32 (or ``dtype`` if wider) as one scale and one shift, then cast: a bfloat16 result is the
    float32 one rounded once (computing in bfloat16 would round three times, ~4x the error).
    """
    work = torch.promote_types(dtype, torch.float32)
    mean_C = torch.as_tensor(mean, dtype=work, device=pixels.device)
    std_C = torch.as_tensor(std, dtype=work, device=pixels.device)
    scale_C11, shift_C11 = (1.0 / (255.0 * std_C)).view(3, 1, 1), (mean_C / std_C).view(3, 1, 1)
    return pixels.to(work).mul_(scale_C11).sub_(shift_C11).to(dtype)


def crop_pixels(img: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """One image -> uint8 (3, S, S): resized, center-cropped, horizontally flipped when ``flip``."""
    pixels_CHW = to_uint8(resize_center_crop(img, size))
    return pixels_CHW.flip(-1) if flip else pixels_CHW


def preprocess(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
) -> torch.Tensor:
    """One image -> normalized float32 (3, S, S) tensor, horizontally flipped when ``flip``."""
    return normalize_pixels(crop_pixels(img, size, flip), mean, std)


def images_to_tensor(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_rng: random.Random | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Decoded images -> (N, 3, S, S); with ``flip_rng`` each image is flipped with probability 1/2.

    ``normalize=False`` gives uint8 pixels (``mean`` and ``std`` unused; see :func:`normalize_pixels`), else float32
    normalized ones. The RNG is consumed once per image, in order, so the same seed gives the same flips.
    """
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.float32 if normalize else torch.uint8)
    flips = [flip_rng is not None and flip_rng.random() < 0.5 for _ in images]
    pixels_NCHW = torch.stack([crop_pixels(img, size, flip) for img, flip in zip(images, flips)])
    return normalize_pixels(pixels_NCHW, mean, std) if normalize else pixels_NCHW
