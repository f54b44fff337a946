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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from clipzoo.errors import RegistryError
from clipzoo.router.entry import DEFAULT_QUANTILE, FILED, KINDS, LEARNED, NEAREST, RANPAC
from clipzoo.router.lda import RanpacConfig, SharedLda
from clipzoo.zoo import registry
from clipzoo.zoo.paths import contained, fsync_tree

if TYPE_CHECKING:  # the routers import torch: loaded only where a router is built or changed in torch
    from clipzoo.router.gate import NearestStatsRouter
    from clipzoo.router.learned import RouterConfig, SparseRouter
    from clipzoo.router.ranpac import RanpacRouter
    from clipzoo.router.stats import TaskStats

ROUTER_DIR = "router"
Router = Union["NearestStatsRouter", "SparseRouter", "RanpacRouter"]


def _files(root: Path, spec: dict) -> tuple[Path, Path] | None:
    """The router version's ``(weights, meta)`` files that ``spec`` lists, checked to lie in the zoo."""
    files = sorted(spec.get("files", {}))
    return (contained(root, files[1]), contained(root, files[0])) if files else None  # sorted: .json first


def _check_covers(root: Path, weights: Path, covered: list[str], names: list[str]) -> None:
    if set(covered) != set(names):
        raise RegistryError(f"the router file {weights.relative_to(root)} covers {covered}, not the experts "
                            f"{names}: run 'clipzoo router --zoo {root} --rebuild'")


def load_router(root: Path, spec: dict, names: list[str], stats: Callable[[str], TaskStats]) -> Router:
    """The router ``spec`` describes over the experts ``names`` (a learned router without a file
    is trained from the stats, in memory); ``stats(name)`` reads an expert's statistics."""
    from clipzoo.router.gate import NearestStatsRouter
    from clipzoo.router.learned import SparseRouter
    from clipzoo.router.ranpac import RanpacRouter

    kind, q = spec.get("kind", NEAREST), float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    if kind == NEAREST:
        return NearestStatsRouter({n: stats(n) for n in names}, q)
    if kind not in FILED:
        raise RegistryError(f"unknown router kind {kind!r} in registry.json: use one of {', '.join(KINDS)} "
                            f"(clipzoo router --zoo {root} --kind KIND)")
    files = _files(root, spec)
    if files is None:
        build = RanpacRouter if kind == RANPAC else SparseRouter
        return build.from_stats({n: stats(n) for n in names}, ood_quantile=q)
    r = RanpacRouter.load(*files, stats, q).read_all() if kind == RANPAC else SparseRouter.load(*files, q)
    _check_covers(root, files[0], r.names, names)
    return r


def saved_config(root: Path, spec: dict) -> RouterConfig | RanpacConfig | None:
    """The settings saved in the router file ``spec`` lists, if any (of the kind that wrote it)."""
    meta = [contained(root, f) for f in spec.get("files", {}) if f.endswith(".json")]
    if not meta or not meta[0].is_file():
        return None
    saved = json.loads(meta[0].read_text())
    if saved.get("kind") == RANPAC:
        return RanpacConfig.from_dict(saved["config"])
    from clipzoo.router.learned import RouterConfig

    return RouterConfig.from_dict(saved["config"])


def stage_router(root: Path, reg: dict, stats: Callable[[str], TaskStats | dict], add: str | None = None,
                 drop: str | list[str] | None = None, rebuild: bool = False,
                 config: RouterConfig | RanpacConfig | None = None,
                 dropped_stats: dict[str, TaskStats | dict] | None = None) -> list[Path]:
    """Bump ``reg["router"]``'s version; for a filed router write its next version (``add`` a
    slot, ``drop`` one or several, or ``rebuild`` from all stats) under a new name, fsynced, and
    list it in ``reg``. Returns the files written (nothing points at them until ``reg`` is written).
    A ranpac router is changed in numpy (:class:`clipzoo.router.lda.SharedLda`, no torch; ``stats``
    may then return a stats file's arrays) and subtracts a dropped task's scatter given in
    ``dropped_stats``; without it, it is rebuilt from the remaining tasks."""
    drops = [drop] if isinstance(drop, str) else list(drop or [])
    old = reg.get("router", {})
    version = int(old.get("version", 0)) + 1
    spec = {**old, "kind": old.get("kind", NEAREST), "version": version, "files": {}}
    names = list(reg["experts"])
    if spec["kind"] not in FILED or not names:
        reg["router"] = spec
        return []
    before = [n for n in names if n != add] + drops
    q = float(spec.get("ood_quantile", DEFAULT_QUANTILE))
    saved = saved_config(root, old) if old.get("kind") == spec["kind"] else None
    stem, folder = f"router-v{version}", contained(root, ROUTER_DIR)
    for f in (f"{stem}.json", f"{stem}.safetensors"):
        contained(root, f"{ROUTER_DIR}/{f}")
    update = _ranpac_update if spec["kind"] == RANPAC else _learned_update
    r = update(_Change(root, old, names, before, stats, add, drops, rebuild, config or saved, q, dropped_stats or {}))
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


@dataclass(frozen=True)
class _Change:
    """One change of a filed router: the experts before and after, what is added and dropped."""

    root: Path
    old: dict                      # the registry's router entry before the change
    names: list[str]               # the experts after
    before: list[str]              # the experts the old version covers
    stats: Callable                # name -> that expert's statistics (or its stats file's arrays)
    add: str | None
    drops: list[str]
    rebuild: bool
    config: RouterConfig | RanpacConfig | None
    q: float                       # the OOD quantile
    gone: dict                     # a dropped expert's statistics, read before its files went

    def old_files(self, kind: str) -> tuple[Path, Path] | None:
        """The old version's ``(weights, meta)`` files when it is of ``kind`` (checked to lie in the zoo)."""
        return _files(self.root, self.old) if self.old.get("kind") == kind else None


def _ranpac_update(c: _Change) -> SharedLda:
    """The next ranpac state: the old one with ``drops`` subtracted and ``add`` added, or one
    built from every task's stats (a rebuild, no earlier file, or a dropped task's stats unread)."""
    files = c.old_files(RANPAC)
    if c.rebuild or not c.before or files is None or not set(c.drops) <= set(c.gone):
        return SharedLda.from_stats({n: c.stats(n) for n in c.names}, c.config or RanpacConfig(), c.q)
    lda = SharedLda.load(*files, c.q)
    _check_covers(c.root, files[0], lda.names, c.before)
    for d in c.drops:
        lda.exclude(d, c.gone[d])
    if c.add:
        lda.include(c.add, c.stats(c.add))
    lda.solve()
    return lda


def _learned_update(c: _Change) -> SparseRouter:
    """The next learned router: the old gate with ``drops``' rows dropped and ``add`` trained in,
    or one trained from every task's stats."""
    from clipzoo.router.learned import RouterConfig, SparseRouter

    files = c.old_files(LEARNED)
    if c.rebuild or not c.before or files is None:
        return SparseRouter.from_stats({n: c.stats(n) for n in c.names}, c.config or RouterConfig(), c.q)
    r = SparseRouter.load(*files, c.q)
    _check_covers(c.root, files[0], r.names, c.before)
    for d in c.drops:
        r.remove(d)
    if c.add:
        r.add(c.add, c.stats(c.add))
    return r


def prune_router_files(root: Path, keep: set[str]) -> None:
    """Delete router files not in ``keep`` (paths relative to the zoo), never through a link."""
    folder = contained(root, ROUTER_DIR) if (root / ROUTER_DIR).exists() else None
    for p in folder.glob("router-v*") if folder is not None and folder.is_dir() else []:
        if str(p.relative_to(root)) not in keep:
            p.unlink(missing_ok=True)
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
