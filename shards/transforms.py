"""Image decoding and preprocessing with PIL and torch only (torchvision does not import beside torch 2.13 here).

Shapes: N images, S the output side; tensors are channels-first, uint8 (0..255) or normalized float32.

The transform is the usual evaluation one (resize the shorter side to S with bicubic filtering, center crop
S x S), plus an optional horizontal flip decided by a caller's RNG so augmentation stays reproducible.
Normalization is separate (:func:`normalize_pixels`): the stream's workers hand uint8 pixels over (a quarter of the
bytes through worker IPC and host-to-device copies) and the training step normalizes them on its device.

The uint8 path is built to cost little more than the JPEG decode itself (``python -m benchmarks.stream``): a JPEG larger
than needed is decoded at a reduced DCT scale (draft mode), resize and crop are one resampling of the crop's source
region, each image's pixels are copied band by band into a (3, S, S) array (:func:`crop_pixels_chw`), which the
stream keeps per item (:mod:`shards.pixel_memo`) and copies into the batch tensor; a DataLoader worker allocates that in
shared memory (as torch's default collate does) so that handing it to the training process copies nothing.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

TRANSFORM_VERSION = 2
"""Changes whenever the pixels this module produces change (a cache of what an encoder makes of them is keyed by it):
2 resamples the crop's source region in one pass (1 resized the whole image, then cropped)."""
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 40_000_000
"""Images whose header claims more pixels are refused before decoding (decompression-bomb guard)."""


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image of an acceptable size."""


def decode_image(data: bytes, size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (JPEG, or anything PIL reads) to a loaded RGB image; raise :class:`ImageDecodeError`.

    With ``size``, a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8) that still keeps both sides >= ``size``
    (PIL's draft mode: much faster for large photos). :func:`resize_center_crop` then gives the same geometry as from
    the full decode; the pixels differ slightly, as the DCT's scaling stands in for part of the bicubic filter's (mean
    absolute difference of the 224 x 224 crop: ~0.1 of 255 on a gradient, ~1.5 on smooth texture, ~7 on pure noise).
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()  # inside the try: a truncated file fails here
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"undecodable image ({type(e).__name__}: {e})") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the central ``size`` x ``size`` square.

    Done as one resampling of the crop's source region (``box``): the same filter taps as resizing the whole image
    and cropping, without computing the cropped-off pixels; only PIL's rounding of its intermediate 8-bit pass may
    differ (a level or two on smooth images). An image that is already ``size`` x ``size`` is returned as it is.
    """
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) == (width, height):
        return img if (width, height) == (size, size) else img.crop((left, top, left + size, top + size))
    sx, sy = width / new_w, height / new_h  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    # reducing_gap: a downscale by 6x or more first averages blocks of scale // 3 pixels (large PNGs; JPEGs had draft)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def _copy_pixels(img: Image.Image, out_CHW: np.ndarray, flip: bool = False) -> None:
    """Write an RGB image's pixels into ``out_CHW`` (3, H, W) uint8, mirrored left-right when ``flip``.

    Band by band: PIL hands each channel over as contiguous bytes, which costs less than numpy's strided transpose
    of the interleaved (H, W, 3) pixels (~70 against ~100 us at 224 px)."""
    width, height = img.size
    for c, band in enumerate(img.split()):
        band_HW = np.frombuffer(band.tobytes(), dtype=np.uint8).reshape(height, width)
        out_CHW[c] = band_HW[:, ::-1] if flip else band_HW


def _uint8_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialized uint8 tensor; with ``shared``, in shared memory when made in a DataLoader worker (as torch's
    default collate allocates its batches): sent to the training process, it is then not copied again."""
    if not shared or get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(np.prod(shape)))).view(shape)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    width, height = img.size
    out_CHW = torch.empty((3, height, width), dtype=torch.uint8)
    _copy_pixels(img, out_CHW.numpy())
    return out_CHW


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


def crop_pixels_chw(img: Image.Image, size: int, flip: bool = False) -> np.ndarray:
    """One image -> uint8 (3, S, S) numpy array: resized, center-cropped (:func:`resize_center_crop`), horizontally
    flipped when ``flip``."""
    out_CHW = np.empty((3, size, size), dtype=np.uint8)
    _copy_pixels(resize_center_crop(img, size), out_CHW, flip)
    return out_CHW


def crop_pixels(img: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """One image -> uint8 (3, S, S) tensor, as :func:`crop_pixels_chw` makes it (sharing its memory)."""
    return torch.from_numpy(crop_pixels_chw(img, size, flip))


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
    # uint8 pixels go to the training process as they are: in shared memory when made in a DataLoader worker
    pixels_NCHW = stack_pixels([crop_pixels_chw(img, size) for img in images], size, flips, shared=not normalize)
    return normalize_pixels(pixels_NCHW, mean, std) if normalize else pixels_NCHW


def stack_pixels(
    pixels: Sequence[np.ndarray | None], size: int, flips: Sequence[bool] = (), shared: bool = True
) -> torch.Tensor:
    """(3, S, S) uint8 arrays -> one (N, 3, S, S) uint8 batch, row n mirrored left-right when ``flips[n]``; a None
    stands for a row of zeros. With ``shared``, the batch is made in shared memory when in a DataLoader worker (handing
    it to the training process then copies nothing)."""
    if not pixels:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    pixels_NCHW = _uint8_buffer((len(pixels), 3, size, size), shared)
    out_NCHW = pixels_NCHW.numpy()
    for n, pixels_CHW in enumerate(pixels):
        if pixels_CHW is None:
            out_NCHW[n] = 0
        else:
            out_NCHW[n] = pixels_CHW[:, :, ::-1] if n < len(flips) and flips[n] else pixels_CHW
    return pixels_NCHW
