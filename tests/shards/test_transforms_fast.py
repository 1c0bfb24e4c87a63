"""The cheap image path: JPEG draft decoding, resize + crop as one resampling, shared-memory batches in workers."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, IterableDataset

from shards.transforms import ImageDecodeError, decode_image, images_to_tensor, resize_center_crop, to_uint8


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def texture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random colour blobs, photo-like (no pixel-level noise)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return img.filter(ImageFilter.GaussianBlur(2))


def resize_then_crop(img: Image.Image, size: int) -> Image.Image:
    """The former two-step transform: resize the whole image, then crop its middle."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("size_wh", [(1000, 750), (500, 1800)])
def test_draft_decode_is_close_to_the_full_decode(size_wh: tuple[int, int]) -> None:
    data = encode(texture(*size_wh), "JPEG")
    drafted, full = decode_image(data, 224), decode_image(data)
    assert full.size == size_wh and drafted.size == (size_wh[0] // 2, size_wh[1] // 2)  # decoded at half scale
    fast = images_to_tensor([drafted], 224, normalize=False)
    slow = images_to_tensor([full], 224, normalize=False)
    assert fast.shape == slow.shape == (1, 3, 224, 224) and fast.dtype == slow.dtype == torch.uint8
    assert (fast.float() - slow.float()).abs().mean() < 2.5  # of 255; measured 1.3-1.5 here


def test_draft_decode_of_a_gradient_is_nearly_exact() -> None:
    x = np.linspace(0, 255, 1200)[None, :]
    y = np.linspace(0, 255, 900)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    data = encode(Image.fromarray(rgb), "JPEG")
    fast = images_to_tensor([decode_image(data, 224)], 224, normalize=False).float()
    slow = images_to_tensor([decode_image(data)], 224, normalize=False).float()
    assert (fast - slow).abs().mean() < 0.5 and (fast - slow).abs().max() <= 3  # measured 0.12 and 1


@pytest.mark.parametrize("size_wh", [(82, 356), (300, 200), (640, 480), (150, 100), (224, 300)])
def test_one_resampling_matches_resize_then_crop(size_wh: tuple[int, int]) -> None:
    img = texture(*size_wh, seed=sum(size_wh))
    ours, before = (
        np.asarray(resize_center_crop(img, 224), dtype=int),
        np.asarray(resize_then_crop(img, 224), dtype=int),
    )
    assert ours.shape == before.shape == (224, 224, 3)
    diff = np.abs(ours - before)  # only PIL's rounding of its intermediate 8-bit pass may differ
    assert diff.max() <= 3 and diff.mean() < 0.25


def test_an_image_of_the_output_size_is_neither_resized_nor_cropped() -> None:
    img = texture(32, 32)
    assert resize_center_crop(img, 32) is img
    assert torch.equal(to_uint8(img), torch.from_numpy(np.array(img)).permute(2, 0, 1))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_other_formats_decode_and_transform(fmt: str) -> None:
    src = texture(300, 200).convert("P") if fmt == "GIF" else texture(300, 200)
    img = decode_image(encode(src, fmt), 64)
    assert img.mode == "RGB" and img.size == (300, 200)  # no draft outside JPEG
    pixels = images_to_tensor([img], 64, normalize=False)
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == torch.uint8


def test_large_png_downscale_stays_close() -> None:  # reducing_gap: a 6.25x downscale first averages 2x2 blocks
    img = decode_image(encode(texture(2000, 1400), "PNG"), 224)
    fast = np.asarray(resize_center_crop(img, 224), dtype=float)
    exact = np.asarray(resize_then_crop(img, 224), dtype=float)
    assert np.abs(fast - exact).mean() < 1.0  # measured 0.42


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_truncated_jpeg_with_draft_raises(cut: float) -> None:
    data = encode(texture(640, 480), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: int(len(data) * cut)], 224)


def test_corrupt_png_raises() -> None:
    data = bytearray(encode(texture(64, 64), "PNG"))
    data[60:80] = b"\x00" * 20
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data), 32)


def test_flip_mirrors_the_batch_rows() -> None:
    imgs = [texture(40, 30, seed=s) for s in range(6)]
    plain = images_to_tensor(imgs, 24, normalize=False)
    flipped = images_to_tensor(imgs, 24, flip_rng=random.Random(3), normalize=False)
    assert flipped.is_contiguous() and flipped.shape == (6, 3, 24, 24)
    mirrored = [torch.equal(f, p.flip(-1)) and not torch.equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or torch.equal(f, p) for m, f, p in zip(mirrored, flipped, plain)) and 0 < sum(mirrored) < 6


class _Pixels(IterableDataset):
    def __iter__(self):
        pixels = images_to_tensor([texture(40, 30), texture(30, 40)], 16, normalize=False)
        yield pixels, pixels.is_shared()  # asked in the worker: sending it would move it to shared memory anyway


def test_worker_batches_are_made_in_shared_memory() -> None:
    assert not images_to_tensor([texture(40, 30)], 16, normalize=False).is_shared()  # not in a worker
    ((pixels, made_shared),) = DataLoader(_Pixels(), batch_size=None, num_workers=1)
    expected = images_to_tensor([texture(40, 30), texture(30, 40)], 16, normalize=False)
    assert made_shared and torch.equal(pixels, expected) and pixels.is_contiguous()
