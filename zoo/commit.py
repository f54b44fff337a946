"""Every change to a zoo is a commit under the zoo's lock, and ``remove`` is one that needs no model.

A commit stages new files under new names first (fsynced; the router's next version) and then
writes ``registry.json`` atomically, which is what makes them part of the zoo: a failed or
interrupted write leaves the zoo as it was. Files the registry no longer names are deleted only
when no other process reads the zoo (:mod:`clipzoo.zoo.leases`). This module imports no torch:
removing a task from a ranpac or nearest-stats zoo reads numpy arrays only
(:func:`clipzoo.zoo.router_files.stage_router`), so ``clipzoo remove`` loads neither torch nor a model.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Callable, Sequence

from safetensors import SafetensorError

from clipzoo.errors import ClipzooError, IntegrityError, RegistryError
from clipzoo.router.entry import RANPAC
from clipzoo.router.stats_file import STATS_FILE, read_arrays
from clipzoo.zoo import leases, paths, registry
from clipzoo.zoo.router_files import stage_router

FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # "no space left" errors
WRITE_FAILURES = (OSError, SafetensorError)  # what a failed write raises (safetensors' is no OSError)


class WriteError(RegistryError, OSError):
    """A commit that could not be written: one line for the CLI, still an OSError for callers."""


def write_error(root: Path, e: BaseException) -> WriteError:
    """The one-line error for a write into ``root`` that failed (full disk, read-only folder, ...)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    return WriteError(f"could not write to {root} ({reason}); the zoo is unchanged")


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in FULL or "No space left" in str(e)


def commit(root: Path, reg: dict, stage: Callable[[], list[Path]], undo: Callable[[], None] = lambda: None,
           free: Sequence[Path] = (), writer: object = None) -> None:
    """Under the lock: stage the router, write ``reg``; on any failure remove what was staged
    (and ``undo()``), so the zoo is exactly as it was. On a full disk, the folders in ``free``
    (the experts ``reg`` drops) are deleted first and the commit is tried once more. Then the
    garbage of ``reg`` is collected unless another process (or another store of this one than
    ``writer``) reads the zoo."""
    router = json.loads(json.dumps(reg.get("router", {})))  # staging bumps it: restored for a retry
    try:
        _try_commit(root, reg, stage, undo)
    except WriteError:
        raise
    except WRITE_FAILURES as e:
        if not _disk_full(e) or not free:
            raise write_error(root, e) from e
        for folder in free:  # a rename into the trash, then the trash's contents: frees space first
            if folder.exists() or folder.is_symlink():
                paths.remove_path(root, leases.to_trash(root, folder))
        reg["router"] = router
        try:
            _try_commit(root, reg, stage, undo)
        except WRITE_FAILURES as e2:
            raise WriteError(
                f"the disk is full: the removed experts' files are deleted, but {registry.REGISTRY} could not "
                f"be written ({getattr(e2, 'strerror', None) or e2}); free some space and run 'clipzoo repair --zoo {root} "
                "--yes'") from e2
    leases.collect(root, reg, keep=leases.previous_to_keep(root, set(router.get("files", {})), writer))


def _try_commit(root: Path, reg: dict, stage: Callable[[], list[Path]], undo: Callable[[], None]) -> None:
    written: list[Path] = []
    try:
        written = stage()
        registry.write(root, reg)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if written and not any(written[0].parent.iterdir()):
            written[0].parent.rmdir()
        undo()
        raise


def check_files(root: Path, name: str, rec: dict, fnames: Sequence[str]) -> None:
    """Raise IntegrityError (naming the expert, the file and the fix) unless each of ``fnames``
    matches its sha256 in ``rec``; a file that matched is not hashed again in this process."""
    folder = paths.expert_path(root, name)
    fix = f"restore it (clipzoo pull) or remove the expert (clipzoo remove --zoo {root} --name {name})"
    if not folder.is_dir():
        raise IntegrityError(f"expert {name!r}: its folder {folder} is missing; {fix}")
    for fname in fnames:
        problem = registry.file_problem(folder / fname, rec["files"][fname])
        if problem:
            raise IntegrityError(f"expert {name!r}: {fname} {problem}; {fix}")


def dependents(reg: dict, name: str) -> list[str]:
    """Experts of ``reg`` composed from ``name``, directly or through another (cycles tolerated)."""
    found: list[str] = []
    frontier, seen = [name], {name}
    while frontier:
        cur = frontier.pop(0)
        for n, rec in reg["experts"].items():
            if cur in rec.get("sources", []) and n not in seen:
                seen.add(n)
                found.append(n)
                frontier.append(n)
    return found[::-1]


def remove(root: Path, name: str, cascade: bool = False, writer: object = None) -> tuple[list[str], dict]:
    """Drop an expert, and with ``cascade=True`` the composed experts that use it (else they
    refuse it), in one commit. Its folder is deleted after the commit (or first, on a full disk)
    once no other process reads the zoo. Returns every name removed (``name`` last) and the
    registry written."""
    root = Path(root)
    with registry.lock(root):
        leases.clean_stale(root)
        reg = registry.read(root)
        if name not in reg["experts"]:
            raise RegistryError(f"no expert named {name!r} in {root}")
        users = dependents(reg, name)
        if users and not cascade:
            raise RegistryError(f"expert {name!r} is a source of fusion expert(s) {', '.join(users)}: "
                                "remove those first, or use --cascade to remove them too")
        gone = users + [name]
        folders = [paths.expert_path(root, n) for n in gone]  # every path checked before anything changes
        kind = reg.get("router", {}).get("kind")
        read = stats_reader(root, dict(reg["experts"]), arrays=True)
        dropped = {}
        for n in gone if kind == RANPAC else ():  # read before any folder goes: the router subtracts them
            try:
                dropped[n] = read(n)
            except ClipzooError:  # a damaged one: the router is rebuilt from the others
                pass
        for n in gone:
            del reg["experts"][n]
        commit(root, reg, lambda: stage_router(root, reg, stats_reader(root, reg["experts"], kind == RANPAC), drop=gone,
                                               dropped_stats=dropped), free=folders, writer=writer)
    return gone, reg


def stats_reader(root: Path, records: dict, arrays: bool = False) -> Callable[[str], object]:
    """Reads an expert's statistics by name, checked against their sha256 in ``records``: numpy
    arrays (what a ranpac router's update needs, no torch) or :class:`clipzoo.router.stats.TaskStats`."""
    def read(name: str) -> object:
        check_files(root, name, records[name], [STATS_FILE])
        found = read_arrays(paths.expert_path(root, name))
        if arrays:
            return found
        from clipzoo.router.stats import TaskStats

        return TaskStats.from_arrays(found)
    return read
