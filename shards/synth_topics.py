"""The latent topics of the synthetic data (:mod:`shards.synth`), shared by all its domains: what a topic's items
say (its vocabulary and categories, mixed with noise words) and how they look (a hue and a pattern, drawn with
random variation and pixel noise)."""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

Pattern = Literal["circles", "stripes", "triangles", "squares", "diagonals", "dots", "rings", "checker"]


@dataclass(frozen=True)
class Topic:
    """A latent topic shared by all domains: what its items say and how they look."""

    name: str
    words: tuple[str, ...]
    categories: tuple[str, ...]
    hue: float
    saturation: float
    pattern: Pattern


_VOCABULARY = {  # topic -> its words; items of a topic talk about them
    "space": "rocket orbit galaxy planet comet nebula astronaut lunar stellar cosmos meteor eclipse",
    "ocean": "wave coral tide harbor sailor reef anchor lagoon dolphin shore current pearl",
    "forest": "pine moss fern trail oak cabin grove timber acorn canopy meadow bark",
    "city": "street neon subway skyline tower traffic loft avenue rooftop downtown metro concrete",
    "desert": "dune cactus mirage sand canyon oasis nomad scorpion sunbaked mesa dust caravan",
    "kitchen": "recipe spice bread garlic harvest honey pastry pepper orchard feast olive cheese",
    "music": "melody rhythm guitar chorus jazz drum ballad tempo violin encore vinyl lyric",
    "winter": "frost glacier blizzard sled icicle snowflake fjord tundra mitten aurora polar chill",
}


def _topic(name: str, categories: tuple[str, ...], hue: float, saturation: float, pattern: Pattern) -> Topic:
    return Topic(name, tuple(_VOCABULARY[name].split()), categories, hue, saturation, pattern)


TOPICS: tuple[Topic, ...] = (
    _topic("space", ("Science Fiction", "Astronomy"), 0.62, 0.75, "circles"),
    _topic("ocean", ("Nautical", "Travel"), 0.50, 0.75, "stripes"),
    _topic("forest", ("Outdoors", "Nature"), 0.33, 0.70, "triangles"),
    _topic("city", ("Urban", "Contemporary"), 0.76, 0.60, "squares"),
    _topic("desert", ("Adventure", "Western"), 0.09, 0.80, "diagonals"),
    _topic("kitchen", ("Cooking", "Lifestyle"), 0.00, 0.80, "dots"),
    _topic("music", ("Music", "Performance"), 0.90, 0.65, "rings"),
    _topic("winter", ("Winter", "Sports"), 0.16, 0.85, "checker"),
)

DOMAIN_NOUNS: dict[str, tuple[str, ...]] = {
    "books": tuple("Novel Guide Memoir Chronicles Handbook Anthology Tales Atlas".split()),
    "movies": tuple("Film Saga Documentary Story Returns Rising Legacy Diaries".split()),
    "fashion": tuple("Jacket Tee Dress Scarf Sneakers Hoodie Skirt Cardigan".split()),
}
GENERIC_NOUNS = tuple("Collection Edition Set Series Pack Classic Special Select".split())
# a few non-ASCII words keep UTF-8 handling honest downstream
NOISE_WORDS = tuple(
    "bright quiet modern classic little golden hidden simple bold gentle wild lost café naïve deluxe vintage "
    "everyday secret grand tiny".split()
)
CONNECTORS = ("a", "the", "of", "with", "and", "for", "in", "from")


# ---- pixels ----------------------------------------------------------------------------------------


Painter = Callable[[ImageDraw.ImageDraw, int, tuple[int, int, int], np.random.Generator], None]


def _circles(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(3, 7))):
        x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.08, 0.18) * s
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)


def _stripes(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    period = s / rng.uniform(4, 7)
    y = -rng.uniform(0, period)
    while y < s:
        draw.rectangle((0, y, s, y + period / 2), fill=fg)
        y += period


def _triangles(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(3, 6))):
        x, y, h = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.15, 0.3) * s
        draw.polygon([(x, y - h / 2), (x - h / 2, y + h / 2), (x + h / 2, y + h / 2)], fill=fg)


def _squares(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(3, 7))):
        x, y, a = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.1, 0.22) * s
        draw.rectangle((x - a, y - a, x + a, y + a), fill=fg)


def _diagonals(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    period = s / rng.uniform(3, 5)
    width = max(1, round(period / 3))
    x = -s - rng.uniform(0, period)
    while x < s:
        draw.line((x, s, x + s, 0), fill=fg, width=width)
        x += period


def _dots(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    step = s / rng.uniform(4, 6)
    r = step * 0.22
    off = rng.uniform(0, step, size=2)
    for gx in np.arange(off[0] - step, s + step, step):
        for gy in np.arange(off[1] - step, s + step, step):
            draw.ellipse((gx - r, gy - r, gx + r, gy + r), fill=fg)


def _rings(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(0.35, 0.65, size=2) * s
    width = max(1, round(s / 24))
    for r in np.arange(s * 0.1, s * 0.8, s * rng.uniform(0.1, 0.14)):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=width)


def _checker(draw: ImageDraw.ImageDraw, s: int, fg: tuple[int, int, int], rng: np.random.Generator) -> None:
    cell = s / int(rng.integers(3, 6))
    for gx in range(round(s / cell)):
        for gy in range(round(s / cell)):
            if (gx + gy) % 2 == 0:
                draw.rectangle((gx * cell, gy * cell, (gx + 1) * cell, (gy + 1) * cell), fill=fg)


_PAINTERS: dict[str, Painter] = {
    p.__name__.lstrip("_"): p for p in (_circles, _stripes, _triangles, _squares, _diagonals, _dots, _rings, _checker)
}
assert set(_PAINTERS) == set(get_args(Pattern)), "every Pattern needs a painter"


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def draw_image(topic: Topic, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image in the topic's hue and pattern, with small random variation and pixel noise."""
    hue = topic.hue + rng.normal(0, 0.02)
    background = _rgb(hue, topic.saturation * rng.uniform(0.35, 0.6), rng.uniform(0.85, 1.0))
    foreground = _rgb(hue, topic.saturation * rng.uniform(0.9, 1.1), rng.uniform(0.45, 0.7))
    image = Image.new("RGB", (size, size), background)
    _PAINTERS[topic.pattern](ImageDraw.Draw(image), size, foreground, rng)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")
