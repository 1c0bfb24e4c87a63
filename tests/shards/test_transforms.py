import io
import random

import pytest
import torch
from PIL import Image

from shards.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    crop_pixels,
    decode_image,
    images_to_tensor,
    normalize_pixels,
    preprocess,
    resize_center_crop,
)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom: every pixel tells where it came from."""
    img = Image.new("RGB", (width, height))
    img.putdata([(255 * x // (width - 1), 255 * y // (height - 1), 0) for y in range(height) for x in range(width)])
    return img


def test_decode_converts_to_rgb() -> None:
    gray = Image.new("L", (5, 7), 128)
    img = decode_image(encode(gray, "JPEG"))
    assert img.mode == "RGB" and img.size == (5, 7)


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("RGB", (9, 9)), "JPEG")[:40]])
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_decode_refuses_oversized_before_decoding() -> None:
    data = encode(Image.new("RGB", (300, 200)), "JPEG")
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(data, max_pixels=300 * 200 - 1)
    assert decode_image(data, max_pixels=300 * 200).size == (300, 200)


def test_draft_keeps_shorter_side_at_least_size() -> None:
    data = encode(gradient(640, 480), "JPEG")
    img = decode_image(data, size=100)
    assert min(img.size) >= 100 and img.size[0] < 640  # decoded at a reduced scale


@pytest.mark.parametrize("size_wh", [(40, 20), (20, 40), (16, 16), (7, 5)])
def test_resize_center_crop_is_square(size_wh: tuple[int, int]) -> None:
    assert resize_center_crop(gradient(*size_wh), 16).size == (16, 16)


def test_center_crop_keeps_the_middle() -> None:
    out = resize_center_crop(gradient(40, 20), 20)  # shorter side already 20: a pure crop of columns 10..29
    assert out.getpixel((0, 0))[0] == gradient(40, 20).getpixel((10, 0))[0]


def test_normalization_of_a_solid_color() -> None:
    color = (200, 100, 50)
    pixels = preprocess(Image.new("RGB", (10, 6), color), 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)
    assert float(pixels.std(dim=(1, 2)).max()) < 1e-5


def test_images_to_tensor_shape_and_empty() -> None:
    imgs = [gradient(12, 8), gradient(8, 12), gradient(30, 30)]
    assert images_to_tensor(imgs, 16).shape == (3, 3, 16, 16)
    assert images_to_tensor([], 16).shape == (0, 3, 16, 16)


def test_flip_is_seeded_and_is_a_mirror() -> None:
    imgs = [gradient(20, 16) for _ in range(8)]
    plain = images_to_tensor(imgs, 16)
    a = images_to_tensor(imgs, 16, flip_rng=random.Random(3))
    b = images_to_tensor(imgs, 16, flip_rng=random.Random(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    flipped = [not torch.equal(a[i], plain[i]) for i in range(len(imgs))]
    assert 0 < sum(flipped) < len(imgs)  # seed 3 flips some, not all
    for i, was_flipped in enumerate(flipped):
        torch.testing.assert_close(a[i], plain[i].flip(-1) if was_flipped else plain[i], rtol=0, atol=0)


def test_uint8_path_is_the_float_path_before_normalization() -> None:
    imgs = [gradient(20, 16), gradient(9, 30), gradient(16, 16)]
    raw = images_to_tensor(imgs, 16, flip_rng=random.Random(3), normalize=False)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 16, 16)
    flips = [not torch.equal(pixels, crop_pixels(img, 16)) for pixels, img in zip(raw, imgs)]
    assert all(torch.equal(pixels, crop_pixels(img, 16, f)) for pixels, img, f in zip(raw, imgs, flips))
    assert 0 < sum(flips) < len(imgs) and raw[:, 0].max() == 255  # seed 3 flips some; the gradient's full red
    normalized = images_to_tensor(imgs, 16, flip_rng=random.Random(3))  # the same flips
    torch.testing.assert_close(normalize_pixels(raw), normalized, rtol=0, atol=1e-5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalized, (raw.float() / 255 - mean) / std, rtol=0, atol=1e-5)
    empty = images_to_tensor([], 16, normalize=False)
    assert empty.shape == (0, 3, 16, 16) and empty.dtype == torch.uint8


def test_normalize_pixels_in_other_dtypes() -> None:
    raw = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    exact = normalize_pixels(raw, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.008)):  # bf16: half its spacing at 2.6
        out = normalize_pixels(raw, dtype=dtype)
        assert out.dtype == dtype and out.shape == raw.shape
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=tol)
    assert raw.dtype == torch.uint8 and raw[0, 0, 1] == 1  # the input is left alone
