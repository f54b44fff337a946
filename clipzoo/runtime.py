"""Process-wide switches, each resolved in one place: progress bars and the cache root.

Progress bars are on unless ``CLIPZOO_DISABLE_PROGRESS_BARS=1`` or
:func:`disable_progress_bars` (the CLI calls it for ``--json``), as in huggingface_hub. The cache
(features, trained global fusions) lives under ``$CLIPZOO_CACHE``, else ``~/.cache/clipzoo``, unless
:func:`set_cache_root` chose another folder for this process.
"""

from __future__ import annotations

import os
from pathlib import Path

_progress: bool | None = None  # None: follow the environment
_cache_root: Path | None = None  # None: follow the environment


def disable_progress_bars() -> None:
    global _progress
    _progress = False


def enable_progress_bars() -> None:
    global _progress
    _progress = True


def progress_bars_enabled() -> bool:
    if _progress is not None:
        return _progress
    return os.environ.get("CLIPZOO_DISABLE_PROGRESS_BARS", "").lower() not in ("1", "true", "yes")


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", min_total: int = 0, **kwargs):
    """A tqdm bar, shown only when bars are enabled and there are at least ``min_total`` steps."""
    from tqdm import tqdm

    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    hidden = not progress_bars_enabled() or (n is not None and n < min_total)
    return tqdm(iterable, total=total, desc=desc, disable=hidden, leave=kwargs.pop("leave", False), **kwargs)


def set_cache_root(path: str | Path | None) -> None:
    """Use ``path`` as this process's cache root (None: back to the environment's)."""
    global _cache_root
    _cache_root = Path(path) if path is not None else None


def cache_root() -> Path:
    """Where cached features and fusion layers live (never inside a zoo directory)."""
    if _cache_root is not None:
        return _cache_root
    return Path(os.environ.get("CLIPZOO_CACHE") or Path.home() / ".cache" / "clipzoo")
