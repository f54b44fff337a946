"""Task data: ImageFolder directories and the built-in synthetic domains."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from clipzoo.tasks import synthetic
from clipzoo.tasks.spec import Split, TaskData, check_name
from clipzoo.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
BUILTIN_PREFIX = "builtin:"


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


def open_image(src) -> Image.Image:
    """Decode an image source to RGB; an unreadable file is a DataError naming it."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    try:
        with Image.open(src) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"unreadable or truncated image {src}: {e}; remove or replace the file") from e


def write_imagefolder(task: TaskData, root: str | Path) -> Path:
    """Write a task's images as ``root/{train,test}/<class>/<i>.png`` (used by the demo)."""
    root = Path(root)
    for which, split in (("train", task.train), ("test", task.test)):
        for i, (img, label) in enumerate(zip(split.images, split.labels)):
            d = root / which / task.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            open_image(img).save(d / f"{i:05d}.png")
    return root
