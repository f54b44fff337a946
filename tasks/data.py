"""Task data: ImageFolder directories and the built-in synthetic domains."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from clipzoo.tasks import synthetic
from clipzoo.tasks.spec import ImageSource, Split, TaskData, check_name
from clipzoo.errors import ConfigError, DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
BUILTIN_PREFIX = "builtin:"
MAX_IMAGE_PIXELS = 40_000_000  # per image, from its header; $CLIPZOO_MAX_IMAGE_PIXELS overrides
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # per image file; $CLIPZOO_MAX_IMAGE_BYTES overrides
PIXELS_ENV, BYTES_ENV = "CLIPZOO_MAX_IMAGE_PIXELS", "CLIPZOO_MAX_IMAGE_BYTES"


def builtin_domains() -> list[str]:
    """Names of the built-in synthetic domains."""
    return list(synthetic.DOMAINS)


def load_builtin(domain: str, n_train: int = 48, n_test: int = 16, name: str | None = None) -> TaskData:
    """A built-in synthetic domain with ``n_train``/``n_test`` images per class."""
    if domain not in synthetic.DOMAINS:
        raise DataError(f"unknown built-in domain {domain!r}: choose one of {', '.join(synthetic.DOMAINS)}")
    drawn = synthetic.DOMAINS[domain]
    classes = [c.replace(" ", "_") for c in drawn]

    def split(n: int, which: str) -> Split:
        imgs, labels = [], []
        for label, cls in enumerate(drawn):
            for i in range(n):
                imgs.append(synthetic.render(domain, cls, i, which))
                labels.append(label)
        return Split(imgs, labels)

    return TaskData(check_name(name or domain), list(classes), split(n_train, "train"), split(n_test, "test"),
                    source=BUILTIN_PREFIX + domain)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_imagefolder(root: str | Path, name: str | None = None) -> TaskData:
    """Read ``root/{train,test}/<class>/*``; class names come from the train folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (expected {root}/train/<class>/*.png)")
    splits = {}
    for which in ("train", "test"):
        sd = root / which
        if not sd.is_dir():
            raise DataError(f"missing split '{which}' in {root}: create {sd}/<class>/ folders of images")
        splits[which] = {d.name: _images_in(d) for d in _class_dirs(sd)}
    classes = sorted(splits["train"])
    if len(classes) < 2:
        raise DataError(f"{root}/train has {len(classes)} class folder(s): a task needs at least 2 classes")
    extra = sorted(set(splits["test"]) - set(classes))
    if extra:
        raise DataError(f"{root}/test has classes not in train: {', '.join(extra)}; add them to train or remove them")
    for which, by_class in splits.items():
        for cls in classes if which == "train" else by_class:
            if not by_class.get(cls):
                raise DataError(f"empty class folder: {root / which / cls} has no images ({', '.join(sorted(IMAGE_EXTS))})")

    def split(which: str) -> Split:
        imgs, labels = [], []
        for label, cls in enumerate(classes):
            for p in splits[which].get(cls, []):
                imgs.append(p)
                labels.append(label)
        return Split(imgs, labels)

    return TaskData(check_name(name or root.name), classes, split("train"), split("test"), source=str(root))


def load_task(spec: str | Path, name: str | None = None) -> TaskData:
    """``builtin:<domain>`` or an ImageFolder directory."""
    s = str(spec)
    if s.startswith(BUILTIN_PREFIX):
        return load_builtin(s[len(BUILTIN_PREFIX):], name=name)
    return load_imagefolder(s, name=name)


def image_limits() -> tuple[int, int]:
    """``(max pixels, max file bytes)`` for one image: ``$CLIPZOO_MAX_IMAGE_PIXELS`` and
    ``$CLIPZOO_MAX_IMAGE_BYTES`` when set (positive integers), else the module defaults."""
    out = []
    for var, default in ((PIXELS_ENV, MAX_IMAGE_PIXELS), (BYTES_ENV, MAX_IMAGE_BYTES)):
        raw = os.environ.get(var, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"${var}={raw!r} is not a positive integer: unset it or give a number like {default}")
        out.append(value)
    return out[0], out[1]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_file_size(src: str | Path) -> int:
    """The size in bytes of an image file; a missing file or one over ``$CLIPZOO_MAX_IMAGE_BYTES``
    is a one-line DataError."""
    max_bytes = image_limits()[1]
    try:
        size = os.stat(src).st_size
    except OSError as e:
        raise DataError(f"cannot read image file {src}: {_one_line(e)}; check the path") from e
    if size > max_bytes:
        raise DataError(f"image file {src} is {size:,} bytes, over the limit of {max_bytes:,}: shrink it, "
                        f"or raise ${BYTES_ENV}")
    return size


def _open_header(src: str | Path) -> Image.Image:
    """Open an image file after checking its size in bytes, and its pixel count from the header
    (nothing is decoded yet); the caller closes it."""
    check_file_size(src)
    max_pixels = image_limits()[0]
    try:
        with warnings.catch_warnings():  # the explicit check below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)  # reads the header only
    except Image.DecompressionBombError as e:  # over PIL's own hard limit, whatever ours is
        raise DataError(f"image {src} claims over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, PIL's own limit "
                        f"(a decompression bomb?): resize or remove it") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"{src} is not an image PIL can read ({_one_line(e)}): remove or replace the file") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise DataError(f"image {src} claims {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                        f"(a decompression bomb?): resize or remove it, or raise ${PIXELS_ENV}")
    return im


def check_image(src: ImageSource) -> tuple[int, int]:
    """Cheap checks of an image file before decoding it: it exists, is at most
    ``$CLIPZOO_MAX_IMAGE_BYTES`` long, has a header PIL recognises, and claims at most
    ``$CLIPZOO_MAX_IMAGE_PIXELS`` pixels. Returns ``(width, height)``; each failure is a one-line
    DataError naming the file and the fix. In-memory images are already decoded and always pass.
    A truncated file passes: only decoding (:func:`open_image`) finds it."""
    if isinstance(src, Image.Image):
        return src.size
    with _open_header(src) as im:
        return im.size


def open_image(src: ImageSource) -> Image.Image:
    """Decode an image source to RGB, refusing hostile files with a one-line DataError naming the
    file and the fix:

    - a missing or unreadable file;
    - a file over ``$CLIPZOO_MAX_IMAGE_BYTES`` bytes (default :data:`MAX_IMAGE_BYTES`, 64 MiB);
    - a file that is not an image;
    - a header claiming more than ``$CLIPZOO_MAX_IMAGE_PIXELS`` pixels (default
      :data:`MAX_IMAGE_PIXELS`, 40 million): a decompression bomb is refused from its header
      (``Image.open``) before ``load()`` decodes any pixel;
    - a truncated or corrupt file (found while decoding).

    The environment variables are read on every call (positive integers). PIL's own guard still
    applies on top: over twice ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179 million) is always refused."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    with _open_header(src) as im:
        try:
            im.load()
            return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DataError(f"unreadable or truncated image {src}: {_one_line(e)}; remove or replace the file") from e


def write_imagefolder(task: TaskData, root: str | Path) -> Path:
    """Write a task's images as ``root/{train,test}/<class>/<i>.png`` (used by the demo)."""
    root = Path(root)
    for which, split in (("train", task.train), ("test", task.test)):
        for i, (img, label) in enumerate(zip(split.images, split.labels)):
            d = root / which / task.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            open_image(img).save(d / f"{i:05d}.png")
    return root
