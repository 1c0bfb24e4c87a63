"""Image decoding and preprocessing with PIL and torch only (torchvision does not import beside torch 2.13 here).

Shapes: N images, S the output side; tensors are channels-first float32.

The transform is the usual evaluation one (resize the shorter side to S with bicubic filtering, center crop
S x S), plus an optional horizontal flip decided by a caller's RNG so augmentation stays reproducible.
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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float (3, H, W) tensor in [0, 1]."""
    width, height = img.size
    pixels_HWC = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels_HWC.permute(2, 0, 1).float().div_(255.0)


def preprocess(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
) -> torch.Tensor:
    """One image -> normalized (3, S, S) tensor, horizontally flipped when ``flip``."""
    pixels_CHW = to_tensor(resize_center_crop(img, size))
    if flip:
        pixels_CHW = pixels_CHW.flip(-1)
    mean_C11 = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_C11 = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels_CHW - mean_C11) / std_C11


def images_to_tensor(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_rng: random.Random | None = None,
) -> torch.Tensor:
    """Decoded images -> (N, 3, S, S); with ``flip_rng`` each image is flipped with probability 1/2.

    The RNG is consumed once per image, in order, so the same seed gives the same flips.
    """
    if not images:
        return torch.empty(0, 3, size, size)
    flips = [flip_rng is not None and flip_rng.random() < 0.5 for _ in images]
    return torch.stack([preprocess(img, size, mean, std, flip) for img, flip in zip(images, flips)])
