"""Who is using a zoo: reader leases, writers' staging folders, and garbage collected after them.

A process that opens a zoo takes a **reader lease**: a file ``.readers/<pid>-<id>/.lock`` on
which it holds an exclusive ``flock`` until the store is released or the process ends (the
kernel drops the lock of a killed process). Writers never delete a file a reader may still
open: a commit only changes ``registry.json``; files it no longer names (old router versions,
removed experts' folders, replaced folders moved to ``.trash/``) are garbage, and
:func:`collect` deletes them only while no other process holds a lease. So a reader that loaded
its registry keeps every file of that version until it is done.

A writer's staging folder ``.staging-<pid>-<id>`` comes with a sibling ``.staging-<pid>-<id>.lock``
held the same way; :func:`clean_stale` (run by every writer) removes staging folders whose lock
nobody holds, that is, of writers that died, and never a live writer's.
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from pathlib import Path

from clipzoo.zoo.paths import EXPERTS_DIR, contained, remove_path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: leases and staging locks are best effort
    fcntl = None  # type: ignore[assignment]

READERS = ".readers"
TRASH = ".trash"
STAGING = ".staging-"
LEASE = ".lock"  # the held file inside each lease folder
LEASE_GRACE_S = 60  # an unheld lease folder younger than this may be one being created
LEGACY_AGE_S = 3600  # a staging folder without a lock (older clipzoo) counts as stale after this


def hold(path: Path) -> int:
    """Create ``path`` holding an exclusive flock on it and return the open descriptor. The file
    is created under a temporary name and renamed once locked, so nobody sees it unlocked."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd


def release(fd: int, path: Path) -> None:
    """Delete a file made by :func:`hold` and drop its lock."""
    try:
        Path(path).unlink(missing_ok=True)
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """True when some process holds the flock of ``path`` (a missing file is not held)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----- staging folders --------------------------------------------------------------------------------
def new_staging(root: Path, tag: str = "") -> tuple[Path, int]:
    """A fresh staging folder ``root/.staging-<tag><pid>-<id>`` and the descriptor of its held lock."""
    name = f"{STAGING}{tag}{os.getpid()}-{uuid.uuid4().hex[:16]}"
    fd = hold(root / f"{name}.lock")
    (root / name).mkdir()
    return root / name, fd


def drop_staging(root: Path, folder: Path, fd: int) -> None:
    """Remove a staging folder (whatever is left of it) and its lock."""
    remove_path(root, folder)
    release(fd, folder.with_name(folder.name + ".lock"))


def clean_stale(root: Path) -> list[str]:
    """Remove staging folders of dead writers (their lock is held by nobody) and stale lease
    files; returns the names removed. A live writer's staging is never touched."""
    removed = []
    for p in sorted(root.glob(f"{STAGING}*")):
        if p.name.endswith(".lock"):
            if not (root / p.name[:-5]).exists() and not is_held(p):
                p.unlink(missing_ok=True)
            continue
        lock = root / f"{p.name}.lock"
        stale = not is_held(lock) if lock.exists() else time.time() - p.lstat().st_mtime > LEGACY_AGE_S
        if stale:
            remove_path(root, p)
            lock.unlink(missing_ok=True)
            removed.append(p.name)
    for p in (root / READERS).iterdir() if (root / READERS).is_dir() else []:
        if not is_held(p / LEASE) and time.time() - p.lstat().st_mtime > LEASE_GRACE_S:
            remove_path(root, p)
    return removed


# ----- reader leases ------------------------------------------------------------------------------------
_LEASES: dict[str, list] = {}  # resolved zoo root -> [fd, path, holders]
_OWNERS: dict[str, weakref.WeakSet] = {}  # resolved zoo root -> the live stores of this process holding its lease


def take_lease(root: Path, owner: object) -> None:
    """Hold this process's reader lease on ``root`` while ``owner`` (a store) is alive. A zoo
    that cannot be written (a read-only disk) gets no lease: no writer can change it either."""
    key = str(Path(root).resolve())
    entry = _LEASES.get(key)
    if entry is None:
        folder = Path(root) / READERS / f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        try:
            folder.mkdir(parents=True)
            entry = _LEASES[key] = [hold(folder / LEASE), folder / LEASE, 0]
        except OSError:
            return
    entry[2] += 1
    _OWNERS.setdefault(key, weakref.WeakSet()).add(owner)
    weakref.finalize(owner, _drop_lease, key)


def local_readers(root: Path, besides: object = None) -> int:
    """Live stores of this process (other than ``besides``) reading ``root`` under its lease."""
    return sum(1 for o in _OWNERS.get(str(Path(root).resolve()), ()) if o is not besides)


def previous_to_keep(root: Path, previous: set[str], writer: object) -> set[str]:
    """The previous router version's files while another store of this process may still read
    them (other processes are covered by their leases); nothing once only ``writer`` reads the
    zoo, so a successful commit prunes the previous version."""
    return set(previous) if local_readers(root, besides=writer) else set()


def _drop_lease(key: str) -> None:
    entry = _LEASES.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        del _LEASES[key]
        try:
            release(entry[0], entry[1])  # the empty folder goes with the next writer's clean_stale
        except OSError:
            pass


def other_readers(root: Path) -> list[str]:
    """Leases of live readers in other processes (this process knows its own state)."""
    folder = root / READERS
    mine = f"{os.getpid()}-"
    return [p.name for p in (sorted(folder.iterdir()) if folder.is_dir() else [])
            if not p.name.startswith(mine) and is_held(p / LEASE)]


# ----- garbage --------------------------------------------------------------------------------------------
def garbage(root: Path, reg: dict, keep: set[str] | frozenset = frozenset()) -> list[Path]:
    """Files and folders the registry ``reg`` does not name (nor ``keep``, zoo-relative router
    files: the previous version while other stores of this process read it, see
    :func:`previous_to_keep`): experts' folders, router files, trash."""
    out = [p for p in sorted((root / EXPERTS_DIR).iterdir()) if p.name not in reg["experts"]] \
        if (root / EXPERTS_DIR).is_dir() and not (root / EXPERTS_DIR).is_symlink() else []
    keep = set(keep) | set(reg.get("router", {}).get("files", {}))
    router = root / "router"
    if router.is_dir() and not router.is_symlink():
        out += [p for p in sorted(router.glob("router-v*")) if f"router/{p.name}" not in keep]
    trash = root / TRASH
    if trash.is_dir() and not trash.is_symlink():
        out += sorted(trash.iterdir())
    return out


def to_trash(root: Path, path: Path) -> Path:
    """Move ``path`` (inside the zoo) into ``.trash/`` under a fresh name; one rename, no space used."""
    contained(root, path.relative_to(root).as_posix()) if not path.is_symlink() else None
    trash = root / TRASH
    trash.mkdir(exist_ok=True)
    dest = trash / f"{path.name}-{uuid.uuid4().hex[:12]}"
    os.rename(path, dest)
    return dest


def collect(root: Path, reg: dict, keep: set[str] | frozenset = frozenset()) -> dict:
    """Under the zoo lock, after a commit: delete the garbage of ``reg`` unless another process
    holds a reader lease (then it waits for a later writer). Returns what happened."""
    readers = other_readers(root)
    if readers:
        return {"deferred": len(garbage(root, reg, keep)), "readers": len(readers)}
    removed = 0
    for p in garbage(root, reg, keep):
        try:
            remove_path(root, p)
            removed += 1
        except OSError:
            pass
    router = root / "router"
    if router.is_dir() and not router.is_symlink() and not any(router.iterdir()):
        router.rmdir()
    if (root / TRASH).is_dir() and not any((root / TRASH).iterdir()):
        (root / TRASH).rmdir()
    return {"deleted": removed, "readers": 0}
