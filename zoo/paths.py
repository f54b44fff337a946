"""Where a zoo may read and write: the one containment rule, durable writes and file modes.

Every name or relative path that comes from the registry, a config, a remote or the command
line goes through :func:`contained` (paths) or :func:`check_name` (expert names) before the zoo
deletes or writes anything there: a path must stay under the zoo after every symlink is
resolved, so a hostile registry or a planted link cannot make a command touch a file outside.

The helpers below it make writes durable (:func:`fsync_tree`: files, then their folders, before
the registry names them) and give new files the modes the user's umask asks for
(:func:`umask_mode`), since ``tempfile.mkstemp`` always creates 0600 files.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from clipzoo.errors import RegistryError
from clipzoo.tasks.spec import NAME_RE

EXPERTS_DIR = "experts"


# ----- containment ---------------------------------------------------------------------------------
def valid_name(name: object) -> bool:
    """True for a task/expert name: 1-64 of ``[A-Za-z0-9_.-]`` starting with a letter or digit
    (so never ``.``, ``..``, a separator or an absolute path)."""
    return isinstance(name, str) and bool(NAME_RE.match(name)) and "/" not in name and "\\" not in name


def check_name(name: object, what: str = "expert name") -> str:
    """``name`` when :func:`valid_name`, else one RegistryError."""
    if not valid_name(name):
        raise RegistryError(f"refusing {what} {name!r}: names are 1-64 letters, digits, '_', '-' or '.', "
                            "starting with a letter or digit (no paths)")
    return str(name)


def check_rel(rel: object) -> str:
    """``rel`` when it is a plain relative path (no absolute path, drive, backslash, empty, ``.``
    or ``..`` part), else one RegistryError. Pure: it does not look at the disk."""
    text = str(rel) if isinstance(rel, (str, PurePosixPath)) else None
    parts = text.split("/") if text else []
    if (not text or text.startswith("/") or "\\" in text or "\0" in text or PureWindowsPath(text).drive
            or any(p in ("", ".", "..") for p in parts)):
        raise RegistryError(f"refusing the path {rel!r}: only plain relative paths inside the zoo are allowed")
    return text


def contained(root: Path, rel: str | PurePosixPath) -> Path:
    """``root / rel`` when it resolves (symlinks followed) inside ``root``; else one RegistryError.
    The one function that decides whether the zoo may read, write or delete at a path."""
    path = Path(root) / check_rel(rel)
    base = Path(root).resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise RegistryError(f"refusing {path}: it cannot be resolved ({e})") from e
    if not real.is_relative_to(base) or real == base:
        raise RegistryError(f"refusing {path}: it leads outside the zoo {root} (to {real}); "
                            "remove the link or restore the folder")
    return path


def expert_path(root: Path, name: str) -> Path:
    """The folder of expert ``name``, checked by :func:`check_name` and :func:`contained`."""
    return contained(root, f"{EXPERTS_DIR}/{check_name(name)}")


def remove_path(root: Path, path: Path) -> None:
    """Delete ``path`` (a file, a folder tree, or a link itself, never what a link points to),
    after checking that it lies inside the zoo. Missing paths are fine."""
    if path.is_symlink():  # the link itself lives in the zoo: unlink it, never follow it
        if not path.parent.resolve().is_relative_to(Path(root).resolve()):
            raise RegistryError(f"refusing to delete {path}: it lies outside the zoo {root}")
        path.unlink()
        return
    if not path.exists():
        return
    contained(root, path.relative_to(root).as_posix())
    if path.is_dir():
        import shutil

        shutil.rmtree(path)  # rmtree never follows links inside the tree
    else:
        path.unlink()


# ----- durability and modes --------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666 / 0777 less the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_path(path: Path) -> None:
    """Flush one file's or folder's data and metadata to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on some systems: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Give every file under ``folder`` (or the file ``folder``) the umask's mode (writers such as
    safetensors create 0600 files), fsync it, then every folder bottom-up, then the parent: after
    it returns, the tree survives a power loss under its current name and is readable by whom
    the umask allows."""
    if not folder.is_dir():
        if not folder.is_symlink():
            umask_mode(folder)
        fsync_path(folder)
        fsync_path(folder.parent)
        return
    dirs: list[Path] = []
    for here, subdirs, files in os.walk(folder):
        dirs.append(Path(here))
        for f in files:
            p = Path(here) / f
            if not p.is_symlink():
                umask_mode(p)
                fsync_path(p)
    for d in reversed(dirs):
        umask_mode(d, directory=True)
        fsync_path(d)
    fsync_path(folder.parent)
