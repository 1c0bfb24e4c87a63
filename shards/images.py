"""Image re-encoding at build time: any readable image -> RGB JPEG no larger than a given side."""

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


def reencode(data: bytes, max_side: int, quality: int) -> bytes:
    """JPEG bytes of ``data`` in RGB, its longest side at most ``max_side``; raises :class:`ImageError`.

    Deterministic: the same input bytes and options give the same output bytes (no EXIF, no timestamps).
    """
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
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def reencode_file(path: Path, max_side: int, quality: int) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image ({e.strerror})") from None
    return reencode(data, max_side, quality)
