"""Built-in synthetic image domains, generated deterministically (no files, no downloads).

Four visually distinct domains, each a small classification task:
``shapes`` (a coloured shape on a light background), ``colours`` (blobs of one hue on dark),
``textures`` (grey-level periodic patterns) and ``digits`` (seven-segment digits, white on black).
Every image is a pure function of (domain, class, index, split), so two runs agree byte for byte.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

SIZE = 32

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 30),
}

# seven segments: a b c d e f g, each as a line between two points on a 2x4 grid
_SEGMENTS = {
    "a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 1)), "c": ((1, 1), (1, 2)), "d": ((0, 2), (1, 2)),
    "e": ((0, 1), (0, 2)), "f": ((0, 0), (0, 1)), "g": ((0, 1), (1, 1)),
}
_DIGIT_SEGMENTS = {
    "zero": "abcdef", "one": "bc", "two": "abged", "three": "abgcd", "four": "fgbc",
    "five": "afgcd", "six": "afgedc", "seven": "abc", "eight": "abcdefg", "nine": "abcdfg",
}

DOMAINS: dict[str, list[str]] = {
    "shapes": ["circle", "square", "triangle", "cross", "star"],
    "colours": list(PALETTE),
    "textures": ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots"],
    "digits": list(_DIGIT_SEGMENTS),
}

SPLIT_OFFSET = {"train": 0, "test": 1_000_000, "pretrain": 2_000_000}


def _rng(domain: str, cls: str, index: int, split: str) -> random.Random:
    return random.Random(f"{domain}/{cls}/{split}/{index + SPLIT_OFFSET[split]}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _noise(img: Image.Image, rng: random.Random, amount: int = 12) -> Image.Image:
    px = img.load()
    for _ in range(SIZE * SIZE // 4):
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        px[x, y] = _jitter(px[x, y], rng, amount)
    return img


def _shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float,
           fill: tuple[int, int, int], rot: float) -> None:
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if name == "square":
        pts = [(cx + r * math.cos(rot + k * math.pi / 2 + math.pi / 4) * 1.2,
                cy + r * math.sin(rot + k * math.pi / 2 + math.pi / 4) * 1.2) for k in range(4)]
    elif name == "triangle":
        pts = [(cx + r * 1.2 * math.cos(rot + k * 2 * math.pi / 3 - math.pi / 2),
                cy + r * 1.2 * math.sin(rot + k * 2 * math.pi / 3 - math.pi / 2)) for k in range(3)]
    elif name == "star":
        pts = [(cx + (r * 1.25 if k % 2 == 0 else r * 0.5) * math.cos(rot + k * math.pi / 5 - math.pi / 2),
                cy + (r * 1.25 if k % 2 == 0 else r * 0.5) * math.sin(rot + k * math.pi / 5 - math.pi / 2))
               for k in range(10)]
    elif name == "cross":
        w = r * 0.38
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    else:
        raise ValueError(f"unknown shape {name!r}")
    draw.polygon(pts, fill=fill)


def _draw_shapes(cls: str, rng: random.Random) -> Image.Image:
    bg = _jitter((225, 225, 220), rng, 15)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    r = rng.uniform(7, 11)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
    colour = _jitter(rng.choice(list(PALETTE.values())), rng)
    _shape(ImageDraw.Draw(img), cls, cx, cy, r, colour, rng.uniform(-0.3, 0.3))
    return _noise(img, rng)


def _draw_colours(cls: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), _jitter((25, 25, 30), rng, 15))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        w, h = rng.uniform(6, 16), rng.uniform(6, 16)
        x, y = rng.uniform(-3, SIZE - 5), rng.uniform(-3, SIZE - 5)
        draw.ellipse([x, y, x + w, y + h], fill=_jitter(PALETTE[cls], rng, 30))
    return _noise(img, rng)


def _draw_textures(cls: str, rng: random.Random) -> Image.Image:
    lo, hi = rng.randint(20, 90), rng.randint(160, 240)
    period, phase = rng.randint(4, 8), rng.randint(0, 7)
    img = Image.new("RGB", (SIZE, SIZE))
    px = img.load()
    for y in range(SIZE):
        for x in range(SIZE):
            if cls == "horizontal stripes":
                on = ((y + phase) // (period // 2 or 1)) % 2
            elif cls == "vertical stripes":
                on = ((x + phase) // (period // 2 or 1)) % 2
            elif cls == "diagonal stripes":
                on = ((x + y + phase) // (period // 2 or 1)) % 2
            elif cls == "checkerboard":
                on = (((x + phase) // (period // 2 or 1)) + ((y + phase) // (period // 2 or 1))) % 2
            elif cls == "dots":
                on = int((((x + phase) % period) - period / 2) ** 2 + (((y + phase) % period) - period / 2) ** 2
                         < (period / 3.2) ** 2)
            else:
                raise ValueError(f"unknown texture {cls!r}")
            v = hi if on else lo
            px[x, y] = (v, v, v)
    return _noise(img, rng, 20)


def _draw_digits(cls: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    h = rng.uniform(9, 12)
    w = h * rng.uniform(0.5, 0.7)
    ox, oy = rng.uniform(4, SIZE - w - 4), rng.uniform(3, SIZE - 2 * h - 3)
    slant = rng.uniform(-0.25, 0.25)
    grey = rng.randint(200, 255)
    width = rng.randint(2, 3)
    for seg in _DIGIT_SEGMENTS[cls]:
        (x0, y0), (x1, y1) = _SEGMENTS[seg]
        p0 = (ox + x0 * w + slant * (2 - y0) * h / 2, oy + y0 * h)
        p1 = (ox + x1 * w + slant * (2 - y1) * h / 2, oy + y1 * h)
        draw.line([p0, p1], fill=(grey, grey, grey), width=width)
    return _noise(img, rng, 30)


_DRAW = {"shapes": _draw_shapes, "colours": _draw_colours, "textures": _draw_textures, "digits": _draw_digits}


def render(domain: str, cls: str, index: int, split: str) -> Image.Image:
    """One image of ``cls`` from ``domain``; a pure function of its arguments."""
    return _DRAW[domain](cls, _rng(domain, cls, index, split))
