"""Feature cache: each image is encoded by the frozen backbone once per
(backbone fingerprint, preprocessing, image content).

Keys are sha256 of the image file's bytes (or of an in-memory image's mode, size and pixels).
Entries live in append-only safetensors shards under ``<root>/<namespace>/``, where the namespace
hashes the fingerprint and the preprocessing; a shard is written atomically, so a crash loses at
most the batch being encoded. The root is ``$CLIPZOO_CACHE`` or ``~/.cache/clipzoo``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from clipzoo.errors import DataError
from clipzoo.tasks.data import check_file_size, open_image
from clipzoo.tasks.spec import ImageSource
from clipzoo.runtime import cache_root, progress_bar
from clipzoo.zoo.registry import atomic_write_bytes


def content_key(src: ImageSource) -> str:
    """sha256 of an image's content: file bytes, or mode+size+pixels for in-memory images."""
    h = hashlib.sha256()
    if isinstance(src, Image.Image):
        h.update(f"{src.mode}|{src.size}|".encode())
        h.update(src.tobytes())
    else:
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """Content-addressed store of one backbone's image features."""

    def __init__(self, namespace_parts: Sequence[str]):
        ns = hashlib.sha256("\n".join(namespace_parts).encode()).hexdigest()[:24]
        self.dir = cache_root() / "features" / ns
        self._index: dict[str, tuple[Path, int]] | None = None

    def _load_index(self) -> dict[str, tuple[Path, int]]:
        if self._index is None:
            self._index = {}
            for shard in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
                with safe_open(str(shard), "pt") as f:
                    keys = json.loads(f.metadata()["keys"])
                self._index.update({k: (shard, i) for i, k in enumerate(keys)})
        return self._index

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached rows for whichever of ``keys`` are present."""
        index = self._load_index()
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for k in keys:
            if k in index:
                by_shard.setdefault(index[k][0], []).append((k, index[k][1]))
        out = {}
        for shard, rows in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                feats = f.get_tensor("feats")
            out.update({k: feats[i] for k, i in rows})
        return out

    def put(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = self.dir / f"{uuid.uuid4().hex}.safetensors"
        data = save({"feats": feats.contiguous().float()}, metadata={"keys": json.dumps(list(keys))})
        atomic_write_bytes(shard, data)
        index = self._load_index()
        index.update({k: (shard, i) for i, k in enumerate(keys)})


def _image_key(src: ImageSource) -> str:
    """:func:`content_key`, after the cheap size checks of a file (so a huge file is not hashed)."""
    if not isinstance(src, Image.Image):
        check_file_size(src)
    try:
        return content_key(src)
    except OSError as e:
        raise DataError(f"cannot read image file {src}: {' '.join(str(e).split())}; check the path") from e


def encode_cached(
    images: Sequence[ImageSource],
    preprocess: Callable[[Image.Image], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache: FeatureCache | None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    errors: dict[int, str] | None = None,
) -> torch.Tensor:
    """Features for ``images``, encoding only those not already in ``cache``.

    An image that cannot be read (:func:`clipzoo.tasks.data.open_image`: missing, too large, not an
    image, a decompression bomb, truncated) raises its DataError; or, when ``errors`` is given, is
    recorded there (index -> one-line message) and skipped: the result then has one row per image
    *not* in ``errors``, in order."""
    keys: list[str | None] = []
    for i, im in enumerate(images):
        keys.append(_guard(i, errors, lambda: _image_key(im)))
    found = cache.get([k for k in keys if k is not None]) if cache is not None else {}
    todo = [i for i, k in enumerate(keys) if k is not None and k not in found]
    new: dict[str, torch.Tensor] = {}
    for b in range(0, len(todo), batch_size):
        decoded = {i: _guard(i, errors, lambda: preprocess(open_image(images[i]))) for i in todo[b:b + batch_size]}
        idx = [i for i, px in decoded.items() if px is not None]
        if progress:
            progress(len(decoded))
        if not idx:
            continue
        feats = encode(torch.stack([decoded[i] for i in idx]))
        bkeys = [keys[i] for i in idx]
        if cache is not None:
            cache.put(bkeys, feats)
        new.update(zip(bkeys, feats))
    if progress and len(todo) < len(keys):
        progress(len(keys) - len(todo))
    rows = [found[k] if k in found else new[k] for i, k in enumerate(keys) if not (errors and i in errors)]
    return torch.stack(rows) if rows else torch.empty(0)


def _guard(i: int, errors: dict[int, str] | None, fn: Callable):
    """``fn()``; a DataError is raised, or recorded in ``errors[i]`` (then None is returned)."""
    try:
        return fn()
    except DataError as e:
        if errors is None:
            raise
        errors[i] = str(e)
        return None


def backbone_features(bb, images: Sequence, desc: str = "encode", errors: dict[int, str] | None = None
                      ) -> torch.Tensor:
    """Frozen image embeddings of ``bb`` (a :class:`clipzoo.zoo.backbone.Backbone`), each image encoded once
    per (fingerprint, preprocessing) through the feature cache (:func:`clipzoo.runtime.cache_root`).
    ``errors``: see :func:`encode_cached` (unreadable images recorded and skipped instead of raised)."""
    cache = FeatureCache([bb.fingerprint, bb.preprocess_id])
    with progress_bar(total=len(images), desc=desc, min_total=64) as bar:
        return encode_cached(images, bb.preprocess, bb.encode_images, cache, progress=bar.update, errors=errors)
