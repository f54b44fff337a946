"""``clipzoo verify`` without torch: a fast path that only ever says "ok".

Every file's sha256 is recomputed, each config must be a JSON object with the common keys, each
safetensors header is parsed and its byte ranges checked (without numpy or torch), the stats have
their fields, and a learned router's files name the zoo's experts. On any doubt it returns None
and the caller runs the full :meth:`clipzoo.zoo.store.Store.verify`, which names each problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipzoo.router.stats_file import FIELDS as STATS_FIELDS

# The same names as clipzoo.zoo.experts.base.CONFIG_KEYS (not imported: that module loads torch;
# tests/test_cost.py checks they agree).
CONFIG_KEYS = ("kind", "classes", "templates", "logit_scale", "backbone_fingerprint")


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _tensor_names(path: Path) -> set[str] | None:
    """The tensor names of a well-formed safetensors file, else None: the header parsed and every
    tensor's byte range checked against its dtype and shape, the ranges covering the data exactly
    (as safetensors itself checks; read here without numpy or torch)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if n <= 0 or 8 + n > size:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            (lo, hi), shape, dtype = t["data_offsets"], t["shape"], t["dtype"]
            count = 1
            for d in shape:
                count *= int(d)
            if hi - lo != count * _DTYPE_BYTES[dtype] or lo < 0:
                return None
        except (TypeError, KeyError, ValueError):
            return None
        spans.append((lo, hi))
    end = 0
    for lo, hi in sorted(spans):
        if lo != end:
            return None
        end = hi
    return {k for k in header if k != "__metadata__"} if end == size - 8 - n else None


def _json_object(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def light_verify(root: Path) -> dict | None:
    """``Store.verify``'s report when every check passes without torch: each file's sha256
    (recomputed), each config a JSON object with the common keys, each safetensors file's header
    and offsets, the stats' fields, and a learned router's files and expert names. None when
    anything is off or unusual (a symlink): the caller then runs the full ``Zoo.verify``, which
    names every problem."""
    from clipzoo.zoo import registry

    reg = registry.read(root)
    for name, rec in reg["experts"].items():
        folder = root / registry.EXPERTS_DIR / name
        if os.path.islink(folder) or any(os.path.islink(folder / f) for f in rec["files"]):
            return None
        if any(registry.file_problem(folder / f, d, cached=False) for f, d in rec["files"].items()):
            return None
        cfg = _json_object(folder / "config.json")
        weights, stats = _tensor_names(folder / "weights.safetensors"), _tensor_names(folder / "stats.safetensors")
        if cfg is None or any(k not in cfg for k in CONFIG_KEYS) or weights is None or stats is None \
                or not set(STATS_FIELDS) <= stats:
            return None
    files = reg.get("router", {}).get("files", {})
    if any(os.path.islink(root / rel) or registry.file_problem(root / rel, d, cached=False) for rel, d in files.items()):
        return None
    if files:
        meta = [_json_object(root / f) for f in files if f.endswith(".json")]
        tensors = [_tensor_names(root / f) for f in files if f.endswith(".safetensors")]
        if len(meta) != 1 or meta[0] is None or not isinstance(meta[0].get("names"), list) \
                or sorted(map(str, meta[0]["names"])) != sorted(reg["experts"]) or len(tensors) != 1 or not tensors[0]:
            return None
    return {"ok": True, "experts": len(reg["experts"]), "problems": []}
