"""Feature cache: each image is encoded by the frozen backbone once per
(backbone fingerprint, preprocessing, image content).

Layout under ``<root>/features/`` (the root is ``$CLIPZOO_CACHE`` or ``~/.cache/clipzoo``):

- ``index.sqlite``: one SQLite database (WAL mode; every write one ``BEGIN IMMEDIATE``
  transaction, so concurrent writers never corrupt it) with two tables: ``entries``
  ``(namespace, key) -> (shard, row)`` or the row itself inline (``vec``), and ``files``, the key
  memo ``path -> (size, mtime_ns, ctime_ns, inode, sha256)``;
- ``<namespace>/<uuid>.safetensors``: shards of float32 rows (tensor ``feats``), written atomically
  before the index names them, at most one per call, only for writes of :data:`SMALL_WRITE` rows or
  more (smaller writes go inline into the index, so single-image predicts create no shard files).

A key is the sha256 of an image file's bytes (or of an in-memory image's mode, size and pixels).
A file's key is taken from the memo while its size, mtime_ns, ctime_ns and inode are unchanged,
and hashed again when any of them changes. A hit costs an index lookup and a read of the requested
rows only (``safe_open`` slices), whatever the number of entries. A cache that cannot be written
(read-only or full disk) is read when possible and otherwise skipped, with one warning per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from clipzoo.errors import DataError
from clipzoo.runtime import cache_root, progress_bar
from clipzoo.tasks.data import check_file_size, open_image
from clipzoo.tasks.spec import ImageSource

INDEX = "index.sqlite"
SMALL_WRITE = 64  # rows; fewer are stored inline in the index instead of in a shard file
_CHUNK = 500  # keys per SQL query (under SQLite's variable limit)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (ns TEXT NOT NULL, key TEXT NOT NULL, shard TEXT, row INTEGER, vec BLOB, "
    "PRIMARY KEY (ns, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, "
    "ino INTEGER, sha256 TEXT) WITHOUT ROWID",
)
_log = logging.getLogger(__name__)
_warned = False
# (db path, pid) -> (connection or None when unusable, the db file's inode when it was opened)
_connections: dict[tuple[str, int], tuple[sqlite3.Connection | None, int | None]] = {}


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


def _warn_once(where: Path, e: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        why = " ".join(str(getattr(e, "strerror", None) or e).split())
        _log.warning("warning: the feature cache at %s cannot be written (%s): features are not cached", where, why)


def _connect(db: Path) -> sqlite3.Connection | None:
    """This process's connection to the index (read-write, else read-only, else None)."""
    slot = (str(db), os.getpid())
    try:
        ino: int | None = db.stat().st_ino
    except OSError:
        ino = None
    if slot in _connections and _connections[slot][1] == ino and ino is not None:
        return _connections[slot][0]
    if slot in _connections and _connections[slot][0] is not None:  # the file was replaced or removed
        _connections[slot][0].close()
    con = None
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(db), timeout=60, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        for stmt in _SCHEMA:
            con.execute(stmt)
    except (OSError, sqlite3.Error) as e:
        if con is not None:
            con.close()
        con = _connect_read_only(db)
        _warn_once(db.parent, e)
    try:
        ino = db.stat().st_ino
    except OSError:
        ino = None
    _connections[slot] = (con, ino)
    return con


def _connect_read_only(db: Path) -> sqlite3.Connection | None:
    """A read-only connection to an existing index, or None."""
    if not db.is_file():
        return None
    for flags in ("mode=ro", "mode=ro&immutable=1"):  # immutable: no -shm file can be created beside it
        try:
            con = sqlite3.connect(f"{db.as_uri()}?{flags}", uri=True, timeout=60, isolation_level=None)
            con.execute("SELECT 1 FROM entries LIMIT 1").fetchall()
            return con
        except sqlite3.Error:
            continue
    return None


def _chunks(items: Sequence, n: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class FeatureCache:
    """Content-addressed store of one backbone's image features (see the module docstring)."""

    def __init__(self, namespace_parts: Sequence[str], root: Path | None = None):
        self.ns = hashlib.sha256("\n".join(namespace_parts).encode()).hexdigest()[:24]
        self.base = Path(root) if root is not None else cache_root() / "features"
        self.dir = self.base / self.ns
        self._memo: list[tuple] = []  # key memo rows waiting for the next write
        self.writable = True

    @property
    def _con(self) -> sqlite3.Connection | None:
        return _connect(self.base / INDEX)

    # ----- keys ---------------------------------------------------------------------------------------
    def key(self, src: ImageSource) -> str:
        """:func:`content_key`, from the memo while the file's size, mtime_ns, ctime_ns and inode
        are unchanged (a file that changes while it is hashed is not memoised)."""
        if isinstance(src, Image.Image):
            return content_key(src)
        path = os.path.abspath(src)
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        con = self._con
        if con is not None:
            row = con.execute("SELECT size, mtime_ns, ctime_ns, ino, sha256 FROM files WHERE path = ?",
                              (path,)).fetchone()
            if row is not None and tuple(row[:4]) == stamp:
                return row[4]
        digest = content_key(src)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == stamp:
            self._memo.append((path, *stamp, digest))
        return digest

    def flush_keys(self) -> None:
        """Write the key memo rows gathered by :meth:`key` (one transaction)."""
        rows, self._memo = self._memo, []
        if rows:
            self._write(lambda con: con.executemany(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, ctime_ns, ino, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                rows))

    # ----- entries ----------------------------------------------------------------------------------
    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached rows for whichever of ``keys`` are present (only those rows are read)."""
        con = self._con
        if con is None or not keys:
            return {}
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[tuple[int, str]]] = {}
        uniq = list(dict.fromkeys(keys))
        try:
            for part in _chunks(uniq):
                q = f"SELECT key, shard, row, vec FROM entries WHERE ns = ? AND key IN ({','.join('?' * len(part))})"
                for key, shard, row, vec in con.execute(q, (self.ns, *part)):
                    if vec is not None:
                        out[key] = torch.frombuffer(bytearray(vec), dtype=torch.float32)
                    elif shard is not None:
                        by_shard.setdefault(shard, []).append((int(row), key))
        except sqlite3.Error:
            return out
        for shard, rows in by_shard.items():
            out.update(self._read_rows(self.dir / shard, sorted(rows)))
        return out

    @staticmethod
    def _read_rows(path: Path, rows: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
        """The requested rows of one shard, contiguous runs read as one slice; a shard that is gone
        or damaged reads as misses."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), "pt") as f:
                sl = f.get_slice("feats")
                n = sl.get_shape()[0]
                i = 0
                while i < len(rows):
                    j = i
                    while j + 1 < len(rows) and rows[j + 1][0] == rows[j][0] + 1:
                        j += 1
                    lo, hi = rows[i][0], rows[j][0] + 1
                    if hi <= n:
                        block = sl[lo:hi]
                        out.update({key: block[r - lo].clone() for r, key in rows[i:j + 1]})
                    i = j + 1
        except Exception:  # noqa: BLE001 - a missing or damaged shard is a cache miss, never an error
            return out
        return out

    def put(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        """Store rows for ``keys``: inline under :data:`SMALL_WRITE` rows, else as one new shard."""
        if not keys or not self.writable:
            return
        feats = feats.detach().to("cpu", torch.float32).contiguous()
        shard: Path | None = None
        if len(keys) < SMALL_WRITE:
            rows = [(self.ns, k, None, None, feats[i].numpy().tobytes()) for i, k in enumerate(keys)]
        else:
            from safetensors.torch import save

            from clipzoo.zoo.registry import atomic_write_bytes

            shard = self.dir / f"{uuid.uuid4().hex}.safetensors"
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(shard, save({"feats": feats}))
            except OSError as e:
                self._disable(e)
                return
            rows = [(self.ns, k, shard.name, i, None) for i, k in enumerate(keys)]
        memo, self._memo = self._memo, []

        def write(con: sqlite3.Connection) -> None:
            con.executemany("INSERT OR REPLACE INTO entries (ns, key, shard, row, vec) VALUES (?, ?, ?, ?, ?)", rows)
            con.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, ctime_ns, ino, sha256) "
                            "VALUES (?, ?, ?, ?, ?, ?)", memo)

        if not self._write(write) and shard is not None:
            shard.unlink(missing_ok=True)

    def _write(self, fn: Callable[[sqlite3.Connection], None]) -> bool:
        """Run ``fn`` in one write transaction; False (and no cache writes from now on) on failure."""
        con = self._con if self.writable else None
        if con is None:
            self.writable = False
            return False
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                fn(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.Error) as e:
            self._disable(e)
            return False
        return True

    def _disable(self, e: BaseException) -> None:
        self.writable = False
        _warn_once(self.base, e)

    def __len__(self) -> int:
        con = self._con
        return 0 if con is None else con.execute("SELECT COUNT(*) FROM entries WHERE ns = ?", (self.ns,)).fetchone()[0]


def _image_key(src: ImageSource, cache: FeatureCache | None = None) -> str:
    """The image's content key (memoised by ``cache``), after the cheap size checks of a file (so
    a huge file is not hashed)."""
    if not isinstance(src, Image.Image):
        check_file_size(src)
    try:
        return cache.key(src) if cache is not None else content_key(src)
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
    """Features for ``images``, encoding only those not already in ``cache`` (``preprocess`` and
    ``encode`` are not called when every image is cached). What is encoded is written to the cache
    once, at the end of the call (also when it is interrupted).

    An image that cannot be read (:func:`clipzoo.tasks.data.open_image`: missing, too large, not an
    image, a decompression bomb, truncated) raises its DataError; or, when ``errors`` is given, is
    recorded there (index -> one-line message) and skipped: the result then has one row per image
    *not* in ``errors``, in order."""
    keys: list[str | None] = []
    for i, im in enumerate(images):
        keys.append(_guard(i, errors, lambda: _image_key(im, cache)))
    found = cache.get([k for k in keys if k is not None]) if cache is not None else {}
    todo = [i for i, k in enumerate(keys) if k is not None and k not in found]
    new: dict[str, torch.Tensor] = {}
    try:
        for b in range(0, len(todo), batch_size):
            decoded = {i: _guard(i, errors, lambda: preprocess(open_image(images[i]))) for i in todo[b:b + batch_size]}
            idx = [i for i, px in decoded.items() if px is not None]
            if progress:
                progress(len(decoded))
            if not idx:
                continue
            feats = encode(torch.stack([decoded[i] for i in idx]))
            new.update(zip([keys[i] for i in idx], feats))
    finally:
        if cache is not None:
            if new:
                cache.put(list(new), torch.stack(list(new.values())))
            else:
                cache.flush_keys()
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
    The model is touched only for images not in the cache. ``errors``: see :func:`encode_cached`."""
    cache = FeatureCache([bb.fingerprint, bb.preprocess_id])
    with progress_bar(total=len(images), desc=desc, min_total=64) as bar:
        return encode_cached(images, lambda im: bb.preprocess(im), lambda px: bb.encode_images(px), cache,
                             progress=bar.update, errors=errors)
