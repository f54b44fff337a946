"""The zoo's ``registry.json``: schema, validation, atomic writes and the write lock.

Layout of a zoo directory::

    registry.json            schema_version, backbone, experts (name -> record), router
    experts/<name>/          config.json, weights.safetensors, stats.safetensors, README.md
    router/router-v<N>.*     the learned router's current (and previous) version
    .lock                    the write lock (filelock)

The registry is the single source of truth: a folder under ``experts/`` that it does not name is
left over from a crash and ignored. Writes go to a temporary file that replaces the registry in
one ``os.replace``, so a reader sees the old or the new registry, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock

from clipzoo.errors import RegistryError

SCHEMA_VERSION = 1
REGISTRY = "registry.json"
LOCK = ".lock"
EXPERTS_DIR = "experts"
EXPERT_KEYS = {"name", "kind", "classes", "files", "sha256", "training", "metrics", "created"}
TOP_KEYS = {"schema_version", "backbone", "experts"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(reg: dict) -> dict:
    """Check a registry's structure; raise RegistryError naming the first problem."""
    if not isinstance(reg, dict):
        raise RegistryError("registry.json is not a JSON object")
    missing = TOP_KEYS - set(reg)
    if missing:
        raise RegistryError(f"registry.json lacks {', '.join(sorted(missing))}")
    if reg["schema_version"] != SCHEMA_VERSION:
        raise RegistryError(
            f"registry schema version {reg['schema_version']} is not supported (this clipzoo reads {SCHEMA_VERSION})"
        )
    bb = reg["backbone"]
    if not isinstance(bb, dict) or not {"model", "fingerprint"} <= set(bb):
        raise RegistryError("registry.json: backbone needs 'model', 'pretrained' and 'fingerprint'")
    if not isinstance(reg["experts"], dict):
        raise RegistryError("registry.json: 'experts' must be an object of name -> record")
    for name, rec in reg["experts"].items():
        lack = EXPERT_KEYS - set(rec)
        if lack:
            raise RegistryError(f"registry.json: expert {name!r} lacks {', '.join(sorted(lack))}")
        if rec["name"] != name:
            raise RegistryError(f"registry.json: expert key {name!r} holds a record named {rec['name']!r}")
        for fname, digest in rec["files"].items():
            if "/" in fname or "\\" in fname or fname.startswith(".") or len(digest) != 64:
                raise RegistryError(f"registry.json: expert {name!r} lists a bad file entry {fname!r}")
    _validate_router(reg.get("router"))
    return reg


def _validate_router(router: dict | None) -> None:
    """The optional ``router`` entry: kind, version and its files (``router/<file>`` -> sha256)."""
    if router is None:
        return
    if not isinstance(router, dict) or not {"kind", "version", "files"} <= set(router):
        raise RegistryError("registry.json: 'router' needs 'kind', 'version' and 'files'")
    for rel, digest in router["files"].items():
        parts = rel.split("/")
        if len(parts) != 2 or parts[0] != "router" or parts[1].startswith(".") or "\\" in rel or len(digest) != 64:
            raise RegistryError(f"registry.json: the router lists a bad file entry {rel!r}")


def read(root: Path) -> dict:
    path = root / REGISTRY
    if not path.is_file():
        raise RegistryError(f"no zoo at {root}: {REGISTRY} missing (create one with 'clipzoo init --zoo {root}')")
    try:
        reg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path} is not valid JSON ({e}); restore it from a backup or the Hub") from e
    return validate(reg)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(root: Path, reg: dict) -> None:
    validate(reg)
    atomic_write_bytes(root / REGISTRY, (json.dumps(reg, indent=2, sort_keys=False) + "\n").encode())


def lock(root: Path, timeout: float = 600) -> FileLock:
    """The zoo's write lock: hold it while reading-modifying-writing the registry."""
    return FileLock(str(root / LOCK), timeout=timeout)
