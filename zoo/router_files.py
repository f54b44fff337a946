"""The zoo's router on disk: build it from the registry's ``router`` entry, and stage new versions.

``registry["router"]`` holds the kind (``learned`` or ``nearest-stats``), a version bumped by every
add, remove or refresh, the OOD quantile, and for a learned router its files
``router/router-v<version>.{json,safetensors}`` with their sha256. A new version is written under
a new name, fsynced, before the registry points at it, so a crash leaves the old version in force;
old versions are garbage deleted by :func:`clipzoo.zoo.leases.collect` once no reader holds them.
Every router path is checked by :func:`clipzoo.zoo.paths.contained` before it is read or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from clipzoo.errors import RegistryError
from clipzoo.router.gate import NearestStatsRouter
from clipzoo.router.learned import KIND as LEARNED
from clipzoo.router.learned import RouterConfig, SparseRouter
from clipzoo.router.ood import DEFAULT_QUANTILE
from clipzoo.router.stats import TaskStats
from clipzoo.zoo import registry
from clipzoo.zoo.paths import contained, fsync_tree

ROUTER_DIR = "router"
KINDS = (NearestStatsRouter.name, LEARNED)
Router = NearestStatsRouter | SparseRouter


def load_router(root: Path, spec: dict, names: list[str], stats: Callable[[str], TaskStats]) -> Router:
    """The router ``spec`` describes over the experts ``names`` (a learned router without a file
    is trained from the stats, in memory); ``stats(name)`` reads an expert's statistics."""
    kind, q = spec.get("kind", NearestStatsRouter.name), float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    if kind == NearestStatsRouter.name:
        return NearestStatsRouter({n: stats(n) for n in names}, q)
    if kind != LEARNED:
        raise RegistryError(f"unknown router kind {kind!r} in registry.json: use {NearestStatsRouter.name!r} "
                            f"or {LEARNED!r} (clipzoo router --zoo {root} --kind KIND)")
    files = sorted(spec.get("files", {}))
    if not files:
        return SparseRouter.from_stats({n: stats(n) for n in names}, ood_quantile=q)
    r = SparseRouter.load(contained(root, files[1]), contained(root, files[0]), q)   # sorted: .json, .safetensors
    if set(r.names) != set(names):
        raise RegistryError(f"the router file {files[1]} covers {r.names}, not the experts {names}: "
                            f"run 'clipzoo router --zoo {root} --rebuild'")
    return r


def saved_config(root: Path, spec: dict) -> RouterConfig | None:
    """The learned gate's settings saved in the router file ``spec`` lists, if any."""
    meta = [contained(root, f) for f in spec.get("files", {}) if f.endswith(".json")]
    if not meta or not meta[0].is_file():
        return None
    return RouterConfig.from_dict(json.loads(meta[0].read_text())["config"])


def stage_router(root: Path, reg: dict, stats: Callable[[str], TaskStats], add: str | None = None,
                 drop: str | list[str] | None = None, rebuild: bool = False,
                 config: RouterConfig | None = None) -> list[Path]:
    """Bump ``reg["router"]``'s version; for a learned router write its next version (``add`` a
    slot, ``drop`` one or several, or ``rebuild`` from all stats) under a new name, fsynced, and
    list it in ``reg``. Returns the files written (nothing points at them until ``reg`` is written)."""
    drops = [drop] if isinstance(drop, str) else list(drop or [])
    old = reg.get("router", {})
    version = int(old.get("version", 0)) + 1
    spec = {**old, "kind": old.get("kind", NearestStatsRouter.name), "version": version, "files": {}}
    names = list(reg["experts"])
    if spec["kind"] != LEARNED or not names:
        reg["router"] = spec
        return []
    before = [n for n in names if n != add] + drops
    q = float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    if rebuild or not before or not old.get("files"):
        cfg = config or saved_config(root, old) or RouterConfig()
        r = SparseRouter.from_stats({n: stats(n) for n in names}, cfg, q)
    else:
        r = load_router(root, old, before, stats)
        for d in drops:
            r.remove(d)
        if add:
            r.add(add, stats(add))
    stem = f"router-v{version}"
    folder = contained(root, ROUTER_DIR)
    for f in (f"{stem}.json", f"{stem}.safetensors"):
        contained(root, f"{ROUTER_DIR}/{f}")
    try:
        written = [folder / f for f in r.save(folder, stem)]
        for p in written:
            fsync_tree(p)
    except BaseException:  # a partly written version: remove it
        for p in folder.glob(f"{stem}.*"):
            p.unlink(missing_ok=True)
        raise
    spec["files"] = {str(p.relative_to(root)): registry.sha256_file(p) for p in written}
    reg["router"] = spec
    return written


def prune_router_files(root: Path, keep: set[str]) -> None:
    """Delete router files not in ``keep`` (paths relative to the zoo), never through a link."""
    folder = contained(root, ROUTER_DIR) if (root / ROUTER_DIR).exists() else None
    for p in folder.glob("router-v*") if folder is not None and folder.is_dir() else []:
        if str(p.relative_to(root)) not in keep:
            p.unlink(missing_ok=True)
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
