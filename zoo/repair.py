"""``clipzoo repair``: bring a zoo that cannot be validated back to a consistent state.

A zoo can be left inconsistent by hand edits, an older clipzoo, a copy that lost files, or a
``remove`` on a full disk whose registry write failed after the expert's files were deleted.
:func:`repair` lists every expert that cannot be validated (a folder outside the zoo, a file
missing or not matching its sha256, a config, weights or stats that do not load, a source that
is itself dropped) and whether the router matches the experts that remain; with
``dry_run=False`` it drops those experts and commits a new router version, in one commit.
"""

from __future__ import annotations

from typing import Any

from clipzoo.errors import ClipzooError, RegistryError
from clipzoo.zoo import leases, registry
from clipzoo.zoo.paths import contained
from clipzoo.zoo.router_files import load_router, saved_config, stage_router
Store = Any  # a clipzoo.zoo.store.Store (not imported: the store imports this module)


def _expert_problem(store: "Store", name: str, rec: dict) -> str | None:
    """Why expert ``name`` cannot be used (None when it loads as the store would load it)."""
    try:
        folder = store.expert_dir(name)
        for fname, digest in rec["files"].items():
            problem = registry.file_problem(folder / fname, digest, cached=False)
            if problem:
                return f"{fname} {problem}"
        store.expert(name)
        store.stats(name)
    except ClipzooError as e:
        return str(e)
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # anything a damaged file may raise
        return f"cannot be loaded ({type(e).__name__}: {e})"
    return None


def diagnose(store: "Store") -> dict:
    """What :func:`repair` would do: ``drop`` (name -> reason) and ``router`` (None when it is fine,
    else why a new version is needed)."""
    reg = store.registry
    drop: dict[str, str] = {}
    for name, rec in reg["experts"].items():
        problem = _expert_problem(store, name, rec)
        if problem:
            drop[name] = problem
    changed = True
    while changed:  # a composed expert over a dropped source goes too
        changed = False
        for name, rec in reg["experts"].items():
            lost = [s for s in rec.get("sources", []) if s in drop]
            if name not in drop and lost:
                drop[name] = f"composes {', '.join(lost)}, which is dropped"
                changed = True
    router = "it must be rebuilt without the dropped experts" if drop else None
    if router is None and reg.get("router", {}).get("files"):
        try:
            load_router(store.root, reg["router"], store.names, store._stats_reader())
            for rel, digest in reg["router"]["files"].items():
                problem = registry.file_problem(contained(store.root, rel), digest, cached=False)
                if problem:
                    raise RegistryError(f"{rel} {problem}")
        except ClipzooError as e:
            router = str(e)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            router = f"cannot be loaded ({type(e).__name__}: {e})"
    return {"drop": drop, "router": router}


def repair(store: "Store", dry_run: bool = True) -> dict:
    """Diagnose the zoo; unless ``dry_run``, drop what cannot be validated and rebuild the router
    as a new version (one commit under the lock; garbage collected after). Returns the report:
    ``ok`` (nothing to do), ``drop``, ``router``, ``applied``."""
    with registry.lock(store.root):
        leases.clean_stale(store.root)
        store.registry = registry.read(store.root)
        found = diagnose(store)
        report = {"zoo": str(store.root), "ok": not found["drop"] and found["router"] is None,
                  "drop": found["drop"], "router": found["router"], "applied": False}
        if report["ok"] or dry_run:
            return report
        reg = registry.read(store.root)
        for name in found["drop"]:
            del reg["experts"][name]
        old = dict(reg.get("router", {}))
        reg["router"] = {**old, "files": {}}  # rebuilt from the stats, never from the old files
        store._commit(reg, lambda: stage_router(store.root, reg, store._stats_reader(reg), rebuild=True,
                                                config=_config(store, old)))
        for name in found["drop"]:
            store._experts.pop(name, None)
    return {**report, "applied": True, "router_version": reg["router"]["version"]}


def _config(store: "Store", spec: dict):
    """The learned gate's saved settings when its file is readable, else the defaults."""
    try:
        return saved_config(store.root, spec)
    except (ClipzooError, OSError, ValueError, KeyError, TypeError):
        return None
