"""Procedural image/caption pairs for pretraining the embedded tiny CLIP (no real images, no downloads).

Every sample is a pure function of ``(seed, index)``. A sample is one of these scene kinds:
- ``objects``: one to three coloured shapes or glyphs, with size and position words, on a background;
- ``glyph``: a letter or digit drawn with PIL's default font at a random size, stroke and slant;
- ``texture``: stripes, checkerboard, dots, rings or a grid at a random angle, period and colours;
- ``natural``: image-like clutter (occluding "dead leaves", 1/f spectral noise, a sky over ground);
- ``builtin``: an image of a built-in synthetic domain (its ``pretrain`` split) captioned with its
  class name, so the zero-shot vocabulary of ``tasks.synthetic`` stays learnt.
Afterwards an image may be blurred, downsampled and re-upsampled, contrast-changed or turned to
grey (which the caption then says). Captions say what is drawn; each also carries a ``key`` (the
caption before its random wording) so that identical contents count as positives in the loss.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from clipzoo.tasks import synthetic

SIZE = synthetic.SIZE

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 130, 30), "pink": (240, 140, 190), "brown": (130, 80, 40),
    "black": (15, 15, 15), "white": (240, 240, 240), "grey": (128, 128, 128), "cyan": (40, 200, 210),
    "dark green": (20, 90, 40), "navy": (20, 30, 100), "beige": (215, 200, 160), "olive": (120, 120, 40),
}
SHAPES = ["circle", "square", "triangle", "cross", "star", "ring", "diamond", "hexagon", "bar"]
TEXTURES = ["stripes", "checkerboard", "dots", "rings", "grid", "zigzag"]
BACKGROUNDS = ["plain", "gradient", "noisy", "striped", "cluttered", "dark", "light"]
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "centre": (0.5, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74),
             "left": (0.26, 0.5), "right": (0.74, 0.5)}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PREFIXES = ["a photo of", "an image of", "a picture of", "a drawing of", "a rendering of", "a close-up of",
            "this is", ""]
KINDS = {"objects": 0.22, "glyph": 0.14, "texture": 0.1, "natural": 0.14, "builtin": 0.4}
BUILTIN_TEMPLATES = ["a photo of a {}.", "an image of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.",
                     "a close-up of a {}.", "a rendering of the {}.", "this is a {}.", "the {}.", "a small {}."]


@dataclass
class Sample:
    """One pretraining pair: a 32x32 RGB image, its caption and its content key."""

    image: Image.Image
    caption: str
    key: str


def _colour(rng: random.Random, exclude: str | None = None) -> tuple[str, tuple[int, int, int]]:
    name = rng.choice([c for c in COLOURS if c != exclude])
    return name, tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[name])  # type: ignore[return-value]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _texture(np_rng: np.random.Generator, kind: str, c1, c2) -> np.ndarray:
    """A full-frame periodic pattern (H, W, 3) uint8 between colours ``c1`` and ``c2``."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    theta = np_rng.uniform(0, math.pi)
    period = np_rng.uniform(3, 10)
    u = (x * math.cos(theta) + y * math.sin(theta)) / period + np_rng.uniform(0, 1)
    v = (-x * math.sin(theta) + y * math.cos(theta)) / period + np_rng.uniform(0, 1)
    if kind == "stripes":
        on = (u % 1) < 0.5
    elif kind == "checkerboard":
        on = ((np.floor(u) + np.floor(v)) % 2) == 0
    elif kind == "dots":
        on = ((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2) < np_rng.uniform(0.04, 0.12)
    elif kind == "rings":
        cx, cy = np_rng.uniform(0, SIZE, 2)
        on = (np.hypot(x - cx, y - cy) / period % 1) < 0.5
    elif kind == "grid":
        on = ((u % 1) < 0.25) | ((v % 1) < 0.25)
    elif kind == "zigzag":
        on = ((u + 0.5 * np.abs((v * 2) % 2 - 1)) % 1) < 0.5
    else:
        raise ValueError(f"unknown texture {kind!r}")
    a = np.array(c1, np.float32)
    b = np.array(c2, np.float32)
    return np.where(on[..., None], a, b).astype(np.uint8)


def _spectral_noise(np_rng: np.random.Generator, colourful: bool) -> np.ndarray:
    """1/f^alpha noise scaled to [0, 255], (H, W, 3): cloud-like, natural-image statistics."""
    alpha = np_rng.uniform(1.0, 2.5)
    fy = np.fft.fftfreq(SIZE)[:, None]
    fx = np.fft.fftfreq(SIZE)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / SIZE) ** alpha
    chans = 3 if colourful else 1
    spec = amp[None] * np.exp(2j * np.pi * np_rng.random((chans, SIZE, SIZE)))
    img = np.real(np.fft.ifft2(spec))
    img = (img - img.min(axis=(1, 2), keepdims=True)) / (np.ptp(img, axis=(1, 2), keepdims=True) + 1e-6)
    img = np.moveaxis(img, 0, -1)
    if not colourful:
        tint = np.array(COLOURS[list(COLOURS)[np_rng.integers(len(COLOURS))]], np.float32) / 255
        img = img * (0.5 + 0.5 * tint)
    return (img * 255).clip(0, 255).astype(np.uint8)


def _gradient(np_rng: np.random.Generator, c1, c2) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    theta = np_rng.uniform(0, 2 * math.pi)
    t = (x - 0.5) * math.cos(theta) + (y - 0.5) * math.sin(theta) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return (np.array(c1, np.float32) * (1 - t) + np.array(c2, np.float32) * t).astype(np.uint8)


def _dead_leaves(rng: random.Random, palette: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """Many occluding random shapes of decreasing size (a classic natural-image stand-in)."""
    img = Image.new("RGB", (SIZE, SIZE), _colour(rng)[1])
    draw = ImageDraw.Draw(img)
    for k in range(rng.randint(15, 45)):
        r = max(1.0, 14 * (1 - k / 50) * rng.uniform(0.3, 1.0))
        cx, cy = rng.uniform(-4, SIZE + 4), rng.uniform(-4, SIZE + 4)
        fill = rng.choice(palette) if palette else _colour(rng)[1]
        fill = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in fill)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=fill)
        else:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1.5), cx + r, cy + r], fill=fill)
    return img


def _background(rng: random.Random, np_rng: np.random.Generator, exclude: str) -> tuple[Image.Image, str]:
    kind = rng.choice(BACKGROUNDS)
    name, c1 = _colour(rng, exclude)
    if kind == "plain":
        return Image.new("RGB", (SIZE, SIZE), c1), f"{_article(name)} {name} background"
    if kind == "dark":
        return Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(0, 40) for _ in range(3))), "a dark background"
    if kind == "light":
        return Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(200, 255) for _ in range(3))), "a light background"
    if kind == "gradient":
        name2, c2 = _colour(rng, name)
        return Image.fromarray(_gradient(np_rng, c1, c2)), f"{_article(name)} {name} to {name2} gradient"
    if kind == "noisy":
        return Image.fromarray(_spectral_noise(np_rng, rng.random() < 0.5)), "a noisy background"
    if kind == "striped":
        _, c2 = _colour(rng, name)
        return Image.fromarray(_texture(np_rng, "stripes", c1, c2)), "a striped background"
    return _dead_leaves(rng), "a cluttered background"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float) -> None:
    if shape in ("circle", "square", "triangle", "cross", "star"):
        synthetic._shape(draw, shape, cx, cy, r, fill, rot)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape in ("diamond", "hexagon"):
        n = 4 if shape == "diamond" else 6
        angles = [rot + 2 * math.pi * k / n for k in range(n)]
        draw.polygon([(cx + r * 1.15 * math.cos(a), cy + r * 1.15 * math.sin(a)) for a in angles], fill=fill)
    elif shape == "bar":
        dx, dy = r * math.cos(rot + 0.8), r * math.sin(rot + 0.8)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=max(2, int(r / 2.5)))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _glyph_text(rng: random.Random) -> tuple[str, str]:
    """A character to draw and the words that name it."""
    if rng.random() < 0.5:
        d = rng.randrange(10)
        return str(d), f"digit {DIGIT_WORDS[d]}"
    ch = chr(ord("a") + rng.randrange(26))
    if rng.random() < 0.5:
        return ch.upper(), f"capital letter {ch}"
    return ch, f"lowercase letter {ch}"


def _draw_glyph(img: Image.Image, text: str, cx: float, cy: float, size: int, fill, stroke: int,
                rot: float) -> Image.Image:
    """Paste ``text`` in ``fill`` centred at (cx, cy), rotated by ``rot`` degrees."""
    layer = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    ImageDraw.Draw(layer).text((SIZE, SIZE), text, fill=255, font=_font(size), anchor="mm",
                               stroke_width=stroke, stroke_fill=255)
    layer = layer.rotate(rot, resample=Image.BILINEAR)
    box = (int(SIZE - cx), int(SIZE - cy))
    mask = layer.crop((box[0], box[1], box[0] + SIZE, box[1] + SIZE))
    img.paste(Image.new("RGB", (SIZE, SIZE), fill), (0, 0), mask)
    return img


def _objects(rng: random.Random, np_rng: np.random.Generator) -> tuple[Image.Image, str]:
    n = rng.choice([1, 1, 1, 2, 2, 3])
    named = []
    first_colour = None
    items = []
    for _ in range(n):
        cname, rgb = _colour(rng)
        first_colour = first_colour or cname
        if rng.random() < 0.75:
            what = rng.choice(SHAPES)
            items.append(("shape", what, cname, rgb))
            named.append((cname, what))
        else:
            text, words = _glyph_text(rng)
            items.append(("glyph", text, cname, rgb))
            named.append((cname, words))
    img, bg_words = _background(rng, np_rng, exclude=first_colour or "")
    draw = ImageDraw.Draw(img)
    if n == 1:
        size = rng.choice(["small", "large"])
        r = rng.uniform(4, 6.5) if size == "small" else rng.uniform(9, 13)
        pos = rng.choice(list(POSITIONS)) if size == "small" else "centre"
        cx, cy = (POSITIONS[pos][0] * SIZE + rng.uniform(-2, 2), POSITIONS[pos][1] * SIZE + rng.uniform(-2, 2))
        places = [(cx, cy, r)]
    else:
        cells = rng.sample(list(POSITIONS)[:4], n)
        places = [(POSITIONS[c][0] * SIZE + rng.uniform(-2, 2), POSITIONS[c][1] * SIZE + rng.uniform(-2, 2),
                   rng.uniform(4.5, 7)) for c in cells]
    for (kind, what, _, rgb), (cx, cy, r) in zip(items, places):
        if kind == "shape":
            _draw_shape(draw, what, cx, cy, r, rgb, rng.uniform(-0.4, 0.4))
        else:
            img = _draw_glyph(img, what, cx, cy, int(r * 2.4), rgb, rng.choice([0, 0, 1]), rng.uniform(-15, 15))
            draw = ImageDraw.Draw(img)
    if n == 1:
        cname, what = named[0]
        where = "" if pos == "centre" else f" in the {pos}"
        return img, f"{_article(size)} {size} {cname} {what}{where} on {bg_words}"
    parts = [f"{_article(c)} {c} {w}" for c, w in named]
    return img, ", ".join(parts[:-1]) + f" and {parts[-1]} on {bg_words}"


def _glyph(rng: random.Random, np_rng: np.random.Generator) -> tuple[Image.Image, str]:
    text, words = _glyph_text(rng)
    style = rng.random()
    if style < 0.4:  # handwriting-like: light strokes on black
        fg_name, fg = "white", (rng.randint(200, 255),) * 3
        img, bg_words = Image.new("RGB", (SIZE, SIZE), (rng.randint(0, 30),) * 3), "black"
    elif style < 0.6:  # dark ink on paper
        fg_name, fg = "black", (rng.randint(0, 50),) * 3
        img, bg_words = Image.new("RGB", (SIZE, SIZE), (rng.randint(200, 255),) * 3), "white"
    else:
        fg_name, fg = _colour(rng)
        bg_name, bg = _colour(rng, fg_name)
        img, bg_words = Image.new("RGB", (SIZE, SIZE), bg), bg_name
    size = rng.randint(14, 34)
    img = _draw_glyph(img, text, SIZE / 2 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-4, 4), size, fg,
                      rng.choice([0, 0, 1, 2]), rng.uniform(-20, 20))
    size_word = "a small" if size < 20 else "a large" if size > 28 else "the"
    return img, f"{size_word} {words} in {fg_name} on {bg_words}"


def _texture_scene(rng: random.Random, np_rng: np.random.Generator) -> tuple[Image.Image, str]:
    kind = rng.choice(TEXTURES)
    n1, c1 = _colour(rng)
    n2, c2 = _colour(rng, n1)
    return Image.fromarray(_texture(np_rng, kind, c1, c2)), f"{n1} and {n2} {kind}"


def _natural(rng: random.Random, np_rng: np.random.Generator) -> tuple[Image.Image, str]:
    kind = rng.choice(["leaves", "noise", "landscape", "blobs"])
    if kind == "leaves":
        _, rgb = _colour(rng)
        return _dead_leaves(rng, [rgb, _colour(rng)[1]] if rng.random() < 0.5 else None), (
            "a cluttered scene of overlapping shapes")
    if kind == "noise":
        colourful = rng.random() < 0.5
        words = "a colourful cloudy noise pattern" if colourful else "a cloudy noise pattern"
        return Image.fromarray(_spectral_noise(np_rng, colourful)), words
    if kind == "landscape":
        sky_name, sky = rng.choice([("blue", (110, 160, 230)), ("grey", (170, 170, 175)), ("orange", (240, 160, 90)),
                                    ("dark", (20, 25, 50))])
        ground_name, ground = rng.choice([("green", (60, 130, 50)), ("brown", (120, 90, 50)),
                                          ("yellow", (210, 190, 110)),
                                          ("blue", (40, 70, 140)), ("white", (230, 230, 235))])
        arr = np.zeros((SIZE, SIZE, 3), np.float32)
        horizon = rng.randint(8, 24)
        arr[:horizon] = sky
        arr[horizon:] = ground
        arr += (_spectral_noise(np_rng, True).astype(np.float32) - 128) * 0.3
        words = f"{_article(sky_name)} {sky_name} sky over {ground_name} ground"
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), words
    cname, rgb = _colour(rng)
    img = Image.new("RGB", (SIZE, SIZE), _colour(rng, cname)[1])
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        x, y, w = rng.uniform(-4, SIZE), rng.uniform(-4, SIZE), rng.uniform(4, 14)
        box = [x, y, x + w, y + w * rng.uniform(0.6, 1.4)]
        draw.ellipse(box, fill=tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in rgb))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))), f"blurry {cname} blobs"


def _builtin(rng: random.Random, index: int) -> tuple[Image.Image, str, str]:
    domain = rng.choice(list(synthetic.DOMAINS))
    cls = rng.choice(synthetic.DOMAINS[domain])
    img = synthetic.render(domain, cls, index, "pretrain")
    return img, rng.choice(BUILTIN_TEMPLATES).format(cls), f"builtin/{cls}"


def _postprocess(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Photometric and resolution changes; returns the image and a caption prefix ('' or a grey note)."""
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.15:
        s = rng.choice([12, 16, 20])
        img = img.resize((s, s), Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
    if rng.random() < 0.3:
        arr = np.asarray(img, np.float32)
        arr = (arr - arr.mean()) * rng.uniform(0.5, 1.3) + arr.mean() + rng.uniform(-30, 30)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.15:
        return img.convert("L").convert("RGB"), "a black and white photo of "
    return img, ""


def sample(seed: int, index: int) -> Sample:
    """The ``index``-th pretraining pair of the stream ``seed`` (deterministic)."""
    rng = random.Random(f"clipzoo-pretrain/{seed}/{index}")
    np_rng = np.random.default_rng([seed, index, 7])
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind == "builtin":
        img, caption, key = _builtin(rng, seed * 10_000_000 + index)
        return Sample(img, caption, key)
    make = {"objects": _objects, "glyph": _glyph, "texture": _texture_scene, "natural": _natural}[kind]
    img, content = make(rng, np_rng)
    img, grey = _postprocess(img, rng)
    if grey:
        return Sample(img, grey + content + ".", grey + content)
    prefix = rng.choice(PREFIXES)
    return Sample(img, f"{prefix} {content}.".strip(), content)


def dataset(seed: int, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    """The first ``n`` samples: images ``(n, 32, 32, 3)`` uint8, captions and keys."""
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions, keys = [], []
    for i in range(n):
        s = sample(seed, i)
        images[i] = np.asarray(s.image.convert("RGB"))
        captions.append(s.caption)
        keys.append(s.key)
    return images, captions, keys
