"""Image re-encoding at build time: any readable image -> an RGB JPEG of its central square at a given side, or of
the whole image no larger than that side."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

# A shard image is at most a few hundred pixels; a source image above this is a decompression bomb.
MAX_SOURCE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_SOURCE_PIXELS


class ImageError(ValueError):
    pass


IMAGE_FITS = ("crop", "contain")
"""How a build sizes images (``--image-fit``): 'crop' keeps the central square, resized to ``size`` x ``size`` (the
stream feeds a model the central square too: at that size it then resamples nothing, and at any smaller size it gives
the same geometry as from the whole image); 'contain' keeps the whole image, its longest side at most ``size`` (a
non-square or smaller image is then resampled by the stream at every batch to fill the square it crops)."""


def reencode(data: bytes, size: int, quality: int, fit: str = "crop") -> bytes:
    """JPEG bytes of ``data`` in RGB, sized by ``fit`` (:data:`IMAGE_FITS`: 'crop' enlarges a smaller central square
    to ``size``, once, where the stream would at every batch; 'contain' never enlarges); raises :class:`ImageError`.

    Deterministic: the same input bytes and options give the same output bytes (no EXIF, no timestamps).
    """
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit must be one of {IMAGE_FITS}, got {fit!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img.convert("RGB")
    except Image.UnidentifiedImageError:
        raise ImageError("unreadable image: not an image format PIL knows") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None
    if fit == "crop":
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        if (size, size) != rgb.size:
            box = (left, top, left + side, top + side)
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, box=box)
    elif max(rgb.size) > size:
        scale = size / max(rgb.size)
        shape = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(shape, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def reencode_file(path: Path, size: int, quality: int, fit: str = "crop") -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image ({e.strerror})") from None
    return reencode(data, size, quality, fit)
