"""The zoo's ``registry.json``: schema, validation, atomic writes and the write lock.

Layout of a zoo directory::

    registry.json            schema_version, backbone, experts (name -> record), router
    experts/<name>/          config.json, weights.safetensors, stats.safetensors, README.md
    router/router-v<N>.*     the ranpac (or learned) router's current version (older ones until no reader needs them)
    .lock                    the write lock (filelock)
    .readers/, .staging-*, .trash/   reader leases, writers' staging, garbage (clipzoo.zoo.leases)

The registry is the single source of truth: a folder under ``experts/`` that it does not name is
left over from a crash and ignored. Writes go to a temporary file that replaces the registry in
one ``os.replace`` (fsynced, then its folder), so a reader sees the old or the new registry,
never half of one. It is strict JSON: NaN and Infinity are refused on read and never written.

Every reader goes through :func:`validate`: one declarative schema (``TOP``, ``BACKBONE``,
``EXPERT``, ``ROUTER``: field -> :class:`Field`) so that a damaged or hand-edited registry is one
RegistryError naming the file, the field and the fix, never a KeyError deep in a command. Files
are checked against their recorded sha256 before use (:func:`file_problem`, once per process).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from clipzoo.errors import RegistryError
from clipzoo.zoo import paths

SCHEMA_VERSION = 1
REGISTRY = "registry.json"
LOCK = ".lock"
EXPERTS_DIR = paths.EXPERTS_DIR
EXPERT_FILES = ("config.json", "weights.safetensors", "stats.safetensors")  # every expert has these
FIX = "restore registry.json from a backup or run 'clipzoo pull' again"


# ----- the schema: one declarative description of registry.json -------------------------------------
@dataclass(frozen=True)
class Kind:
    """A kind of JSON value: how a message names it, and the test a value must pass."""

    name: str
    test: Callable[[Any], bool]


def _plain_file(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


_SHA = re.compile(r"[0-9a-f]{64}")
STR = Kind("a string", lambda v: isinstance(v, str))
NAME = Kind("a task name (letters, digits, '_', '-', '.')", paths.valid_name)
INT = Kind("a non-negative integer", lambda v: type(v) is int and v >= 0)
NUMBER = Kind("a finite number", lambda v: type(v) is int or (type(v) is float and math.isfinite(v)))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
OPT_STR = Kind("a string or null", lambda v: v is None or isinstance(v, str))
SHA256 = Kind("a sha256 (64 lowercase hex digits)", lambda v: isinstance(v, str) and bool(_SHA.fullmatch(v)))
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
CLASSES = Kind("a non-empty list of strings", lambda v: STRINGS.test(v) and len(v) > 0)
NUMBERS = Kind("an object of name -> number", lambda v: isinstance(v, dict) and all(NUMBER.test(x) for x in v.values()))
FILES = Kind("an object of file name -> sha256 listing " + ", ".join(EXPERT_FILES),
             lambda v: isinstance(v, dict) and set(EXPERT_FILES) <= set(v)
             and all(_plain_file(f) and SHA256.test(d) for f, d in v.items()))
ROUTER_FILES = Kind("an object of router/<file> -> sha256",
                    lambda v: isinstance(v, dict) and all(isinstance(f, str) and SHA256.test(d) for f, d in v.items()))


@dataclass(frozen=True)
class Field:
    """One field of a registry object: its kind, and whether it must be present."""

    kind: Kind
    required: bool = True


TOP = {"schema_version": Field(INT), "clipzoo_version": Field(STR, False), "backbone": Field(OBJECT),
       "experts": Field(OBJECT), "router": Field(OBJECT, False)}
BACKBONE = {"model": Field(STR), "pretrained": Field(OPT_STR, False), "fingerprint": Field(STR),
            "params": Field(INT, False), "embed_dim": Field(INT, False)}
EXPERT = {"name": Field(NAME), "kind": Field(STR), "classes": Field(CLASSES), "templates": Field(STRINGS, False),
          "files": Field(FILES), "sha256": Field(SHA256), "trainable_params": Field(INT),
          "trainable_share": Field(NUMBER, False), "training": Field(OBJECT), "metrics": Field(NUMBERS),
          "created": Field(STR), "sources": Field(STRINGS, False)}
ROUTER = {"kind": Field(STR), "version": Field(INT), "files": Field(ROUTER_FILES), "ood_quantile": Field(NUMBER, False)}
EXPERT_KEYS = {k for k, f in EXPERT.items() if f.required}
TOP_KEYS = {k for k, f in TOP.items() if f.required}


def _fail(where: str, field: str, problem: str) -> RegistryError:
    return RegistryError(f"{where}: {field} {problem}; {FIX}")


def _check(obj: dict, schema: dict[str, Field], where: str, prefix: str) -> None:
    """Raise RegistryError for the first field of ``obj`` that is missing or of the wrong kind."""
    for key, spec in schema.items():
        label = f"{prefix}{key}"
        if key not in obj:
            if spec.required:
                raise _fail(where, label, "is missing")
        elif not spec.kind.test(obj[key]):
            raise _fail(where, label, f"must be {spec.kind.name}, not {_show(obj[key])}")


def _show(value: Any) -> str:
    """A short rendering of a wrong value for a message."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def validate(reg: Any, where: str | Path = REGISTRY) -> dict:
    """Check a registry against the schema above; raise RegistryError (one line: the file, the
    field, the fix) for the first problem. ``where`` names the file in messages."""
    where = str(where)
    if not isinstance(reg, dict):
        raise _fail(where, "the document", f"must be a JSON object, not {_show(reg)}")
    version = reg.get("schema_version")
    if type(version) is int and version > SCHEMA_VERSION:
        raise RegistryError(f"{where}: schema_version {version} was written by a newer clipzoo (this one reads "
                            f"{SCHEMA_VERSION}); upgrade clipzoo (pip install -U clipzoo)")
    _check(reg, TOP, where, "")
    if version != SCHEMA_VERSION:
        raise _fail(where, "schema_version", f"{version} is not supported (this clipzoo reads {SCHEMA_VERSION})")
    _check(reg["backbone"], BACKBONE, where, "backbone.")
    for name, rec in reg["experts"].items():
        prefix = f"experts[{name!r}]."
        if not NAME.test(name):
            raise _fail(where, f"experts[{name!r}]", f"is not {NAME.name}")
        if not isinstance(rec, dict):
            raise _fail(where, f"experts[{name!r}]", f"must be an object (the expert's record), not {_show(rec)}")
        _check(rec, EXPERT, where, prefix)
        if rec["name"] != name:
            raise _fail(where, f"{prefix}name", f"is {rec['name']!r}, but the record is filed under {name!r}")
        bad = [s for s in rec.get("sources", []) if not paths.valid_name(s)]
        if bad:
            raise _fail(where, f"{prefix}sources", f"names {bad[0]!r}, not {NAME.name}")
        unknown = [s for s in rec.get("sources", []) if s not in reg["experts"]]
        if unknown:
            raise _fail(where, f"{prefix}sources", f"names {', '.join(map(repr, unknown))}, not an expert of this zoo")
    _validate_router(reg.get("router"), where)
    return reg


def _validate_router(router: dict | None, where: str = REGISTRY) -> None:
    """The optional ``router`` entry: kind, version and either no files or the version's two
    (``router/router-v<version>.json`` and ``.safetensors`` -> sha256)."""
    if router is None:
        return
    if not isinstance(router, dict) or not {"kind", "version", "files"} <= set(router):
        raise _fail(where, "router", "needs 'kind', 'version' and 'files'")
    for rel, digest in router["files"].items() if isinstance(router["files"], dict) else ():
        parts = str(rel).split("/")
        try:
            paths.check_rel(rel)
        except RegistryError:
            raise _fail(where, "router.files", f"lists a bad file entry {rel!r}") from None
        if len(parts) != 2 or parts[0] != "router" or not _plain_file(parts[1]) or not SHA256.test(digest):
            raise _fail(where, "router.files", f"lists a bad file entry {rel!r}")
    _check(router, ROUTER, where, "router.")
    stem = f"router/router-v{router['version']}"
    if router["files"] and set(router["files"]) != {f"{stem}.json", f"{stem}.safetensors"}:
        raise _fail(where, "router.files", f"must list {stem}.json and {stem}.safetensors (version "
                    f"{router['version']}), not {', '.join(sorted(router['files']))}")


def _no_constant(name: str) -> Any:
    """Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON numbers."""
    raise ValueError(f"{name} is not a JSON number (strict JSON has no NaN or Infinity)")


def dumps(reg: dict) -> bytes:
    """The registry as strict JSON bytes; a non-finite number is one RegistryError."""
    try:
        return (json.dumps(reg, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    except ValueError as e:
        raise RegistryError(f"refusing to write {REGISTRY}: a value is NaN or infinite ({e}); "
                            "check the settings and metrics") from e


def read(root: Path) -> dict:
    """The zoo's registry, validated; any unreadable or malformed file is one RegistryError."""
    path = root / REGISTRY
    if not path.is_file():
        raise RegistryError(f"no zoo at {root}: {REGISTRY} missing (create one with 'clipzoo init --zoo {root}')")
    try:
        reg = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise RegistryError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from e
    except UnicodeDecodeError as e:
        raise RegistryError(f"{path} is not UTF-8 text (byte {e.start}); {FIX}") from e
    except (ValueError, RecursionError) as e:
        raise RegistryError(f"{path} is not valid JSON ({e}); {FIX}") from e
    return validate(reg, path)


# ----- file integrity --------------------------------------------------------------------------------
_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, digest) checked in this process


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, digest: str, cached: bool = True) -> str | None:
    """Why ``path`` is not the file registry.json records with ``digest`` (None when it is).
    A file that matched is remembered by size and mtime, so each is hashed once per process
    (``cached=False`` hashes it again, as ``clipzoo verify`` does)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, digest)
    if cached and key in _VERIFIED:
        return None
    try:
        actual = sha256_file(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if actual != digest:
        return f"does not match its sha256 in {REGISTRY}"
    _VERIFIED.add(key)
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder (mode from the umask, not
    mkstemp's 0600), fsync it, rename it over ``path`` and fsync the folder, so that after a
    power loss ``path`` holds the old bytes or the new ones, never part of them."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~paths.current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    paths.fsync_path(path.parent)


def write(root: Path, reg: dict) -> None:
    validate(reg)
    atomic_write_bytes(root / REGISTRY, dumps(reg))


@contextmanager
def lock(root: Path, timeout: float = 600) -> Iterator[FileLock]:
    """The zoo's write lock: hold it while reading-modifying-writing the registry. A lock that
    cannot be taken (held too long, or ``.lock`` is not a file) is one RegistryError."""
    path = root / LOCK
    flock = FileLock(str(path), timeout=timeout)
    try:
        flock.acquire()
    except Timeout as e:
        raise RegistryError(f"{path} is held by another clipzoo process for over {timeout:.0f}s: wait for it, "
                            "or delete the file if no clipzoo is running") from e
    except OSError as e:
        what = "is a directory, not the lock file" if path.is_dir() else f"cannot be opened ({e.strerror or e})"
        raise RegistryError(f"{path} {what}: remove it (it holds no data) and try again") from e
    try:
        yield flock
    finally:
        flock.release()
