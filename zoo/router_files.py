"""The zoo's router on disk: build it from the registry's ``router`` entry, and stage new versions.

``registry["router"]`` holds the kind (``ranpac``, the default; ``learned`` or ``nearest-stats``), a
version bumped by every add, remove or refresh, the OOD quantile, and for a ranpac or learned router its files
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
from clipzoo.router.ranpac import KIND as RANPAC
from clipzoo.router.ranpac import RanpacConfig, RanpacRouter
from clipzoo.router.stats import TaskStats
from clipzoo.zoo import registry
from clipzoo.zoo.paths import contained, fsync_tree

ROUTER_DIR = "router"
KINDS = (RANPAC, LEARNED, NearestStatsRouter.name)
FILED = (RANPAC, LEARNED)  # kinds kept in versioned files
Router = NearestStatsRouter | SparseRouter | RanpacRouter


def load_router(root: Path, spec: dict, names: list[str], stats: Callable[[str], TaskStats],
                lazy: bool = False) -> Router:
    """The router ``spec`` describes over the experts ``names`` (a learned router without a file
    is trained from the stats, in memory); ``stats(name)`` reads an expert's statistics. ``lazy``:
    a ranpac router reads them only when needed (an update reads none but the new task's)."""
    kind, q = spec.get("kind", NearestStatsRouter.name), float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    if kind == NearestStatsRouter.name:
        return NearestStatsRouter({n: stats(n) for n in names}, q)
    if kind not in FILED:
        raise RegistryError(f"unknown router kind {kind!r} in registry.json: use one of {', '.join(KINDS)} "
                            f"(clipzoo router --zoo {root} --kind KIND)")
    files = sorted(spec.get("files", {}))
    if not files:
        build = RanpacRouter if kind == RANPAC else SparseRouter
        return build.from_stats({n: stats(n) for n in names}, ood_quantile=q)
    weights, meta = contained(root, files[1]), contained(root, files[0])   # sorted: .json, .safetensors
    r = RanpacRouter.load(weights, meta, stats, q) if kind == RANPAC else SparseRouter.load(weights, meta, q)
    if kind == RANPAC and not lazy:
        r.read_all()
    if set(r.names) != set(names):
        raise RegistryError(f"the router file {files[1]} covers {r.names}, not the experts {names}: "
                            f"run 'clipzoo router --zoo {root} --rebuild'")
    return r


def saved_config(root: Path, spec: dict) -> RouterConfig | RanpacConfig | None:
    """The settings saved in the router file ``spec`` lists, if any (of the kind that wrote it)."""
    meta = [contained(root, f) for f in spec.get("files", {}) if f.endswith(".json")]
    if not meta or not meta[0].is_file():
        return None
    saved = json.loads(meta[0].read_text())
    return (RanpacConfig if saved.get("kind") == RANPAC else RouterConfig).from_dict(saved["config"])


def stage_router(root: Path, reg: dict, stats: Callable[[str], TaskStats], add: str | None = None,
                 drop: str | list[str] | None = None, rebuild: bool = False,
                 config: RouterConfig | RanpacConfig | None = None,
                 dropped_stats: dict[str, TaskStats] | None = None) -> list[Path]:
    """Bump ``reg["router"]``'s version; for a filed router write its next version (``add`` a
    slot, ``drop`` one or several, or ``rebuild`` from all stats) under a new name, fsynced, and
    list it in ``reg``. Returns the files written (nothing points at them until ``reg`` is written).
    A ranpac router subtracts a dropped task's scatter given in ``dropped_stats``; without it it
    is rebuilt from the remaining tasks."""
    drops = [drop] if isinstance(drop, str) else list(drop or [])
    old = reg.get("router", {})
    version = int(old.get("version", 0)) + 1
    spec = {**old, "kind": old.get("kind", NearestStatsRouter.name), "version": version, "files": {}}
    names = list(reg["experts"])
    if spec["kind"] not in FILED or not names:
        reg["router"] = spec
        return []
    before = [n for n in names if n != add] + drops
    q = float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    ranpac = spec["kind"] == RANPAC
    saved = saved_config(root, old) if old.get("kind") == spec["kind"] else None
    gone = dropped_stats if ranpac and drops and set(drops) <= set(dropped_stats or {}) else None
    if rebuild or not before or not old.get("files") or (ranpac and drops and gone is None):
        if ranpac:
            r = RanpacRouter.from_stats({n: stats(n) for n in names}, config or saved or RanpacConfig(), q)
        else:
            r = SparseRouter.from_stats({n: stats(n) for n in names}, config or saved or RouterConfig(), q)
    else:
        r = load_router(root, old, before, lambda n: gone[n] if gone and n in gone else stats(n), lazy=True)
        for d in drops:
            r.remove(d, gone[d]) if ranpac else r.remove(d)
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
