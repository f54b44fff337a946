"""What a request may carry, checked before it joins a batch: the body (size, form), the images
(each decoded and checked by :func:`clipzoo.tasks.data.open_image`, which enforces the pixel and
byte limits) and the options. Every refusal is a :class:`BadRequest` with an HTTP status and one
line naming the problem and, where there is one, the fix.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from clipzoo.errors import DataError
from clipzoo.serve.batcher import MODES, Options
from clipzoo.tasks.data import open_image

MAX_TOP_K = 64


class BadRequest(Exception):
    """A request refused with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(" ".join(reason.split()))
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Per-request limits: images per request, bytes per request body (per-image pixel and byte
    limits are those of :func:`clipzoo.tasks.data.image_limits`)."""

    max_images: int = 64
    max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.max_bytes < 1:
            raise ValueError("max_images and max_bytes must be positive")


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.strip().lower() in ("1", "true", "yes")
    raise BadRequest(400, f"{key} must be true or false, not {value!r}")


def parse_options(raw: dict[str, Any]) -> Options:
    """Options from JSON fields or query/form parameters: top_k, mode, fallback, classes, task."""
    unknown = set(raw) - {"top_k", "mode", "fallback", "classes", "task", "images", "names"}
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(sorted(unknown))}: use images, names, top_k, mode, "
                              "fallback, classes, task")
    v = raw.get("top_k", 1)
    top_k = v if type(v) is int else int(v) if isinstance(v, str) and v.strip().isdigit() else None
    if top_k is None or not 1 <= top_k <= MAX_TOP_K:
        raise BadRequest(400, f"top_k must be an integer from 1 to {MAX_TOP_K}, not {raw.get('top_k')!r}")
    mode = raw.get("mode", "top1")
    if mode not in MODES:
        raise BadRequest(400, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    task = raw.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise BadRequest(400, f"task must be an expert name, not {task!r}")
    if mode != "top1" and task is None and top_k < 2:
        raise BadRequest(400, f"mode {mode!r} combines the router's top-k experts: use top_k 2 or more")
    classes = raw.get("classes")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    if classes is not None and (not isinstance(classes, list) or not classes
                                or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise BadRequest(400, "classes must be non-empty class names (a list, or comma-separated), e.g. cat,dog")
    return Options(top_k=top_k, mode=mode, fallback=_bool(raw.get("fallback", True), "fallback"),
                   classes=tuple(classes) if classes else None, task=task)


def parse_json(body: bytes, limits: Limits) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """``{"images": [base64, ...], "names"?: [...], options...}`` -> named image bytes and options.
    A ``data:image/...;base64,`` prefix is accepted."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise BadRequest(400, 'the JSON body must be an object with "images": a list of base64-encoded images')
    images = doc["images"]
    check_count(len(images), limits)
    names = doc.get("names")
    if names is not None and (not isinstance(names, list) or len(names) != len(images)
                              or not all(isinstance(n, str) for n in names)):
        raise BadRequest(400, '"names" must be a list of strings, one per image')
    out = []
    for i, item in enumerate(images):
        name = names[i] if names else f"<image {i}>"
        if not isinstance(item, str):
            raise BadRequest(400, f"image {i} must be a base64 string, not {type(item).__name__}")
        if item.startswith("data:") and "," in item:
            item = item.split(",", 1)[1]
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(400, f"image {i} ({name}) is not valid base64 ({e})") from None
        out.append((name, data))
    return out, {k: v for k, v in doc.items() if k not in ("images", "names")}


def check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise BadRequest(400, "no images in the request: send multipart files or JSON {\"images\": [base64, ...]}")
    if n > limits.max_images:
        raise BadRequest(413, f"{n} images in one request, over the limit of {limits.max_images}: split the request "
                              "(or start the server with a larger --max-images)")


class Decoder:
    """Decodes uploaded image bytes through :func:`clipzoo.tasks.data.open_image` (which reads
    files: each upload is spooled to a private temporary folder and deleted right after) and
    preprocesses them for the backbone."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="clipzoo-serve-")

    def close(self) -> None:
        self._dir.cleanup()

    def image(self, name: str, data: bytes) -> Image.Image:
        """The decoded RGB image; a bad one is a BadRequest naming ``name``."""
        if not data:
            raise BadRequest(400, f"image {name} is empty (0 bytes)")
        fd, tmp = tempfile.mkstemp(dir=self._dir.name, suffix=".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return open_image(Path(tmp))
        except DataError as e:
            status = 413 if "over the limit" in str(e) else 400
            raise BadRequest(status, str(e).replace(tmp, name)) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def pixels(self, items: list[tuple[str, bytes]], preprocess: Callable[[Image.Image], Any]) -> Any:
        """Preprocessed pixels ``(n, 3, H, W)`` of every image, or the first BadRequest."""
        import torch

        return torch.stack([preprocess(self.image(name, data)) for name, data in items])
