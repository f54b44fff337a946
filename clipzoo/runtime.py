"""Process-wide switches, each resolved in one place: progress bars, the cache root and threads.

Progress bars are on unless ``CLIPZOO_DISABLE_PROGRESS_BARS=1`` or
:func:`disable_progress_bars` (the CLI calls it for ``--json``), as in huggingface_hub. The cache
(features, trained global fusions) lives under ``$CLIPZOO_CACHE``, else ``~/.cache/clipzoo``, unless
:func:`set_cache_root` chose another folder for this process. Threads (torch's intra-op pool and BLAS)
are set once per process by :func:`set_threads` (the CLI root calls it): ``$CLIPZOO_THREADS``, else
the number of CPUs this process may use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

THREADS_ENV = "CLIPZOO_THREADS"
_BLAS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_threads: int | None = None  # None: not set in this process yet
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


def default_threads() -> int:
    """``$CLIPZOO_THREADS`` when set (a positive integer), else the CPUs this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            from clipzoo.errors import ConfigError

            raise ConfigError(f"bad {THREADS_ENV}={value!r}: use a positive integer")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default :func:`default_threads`) for torch and BLAS in this process.

    Libraries not loaded yet read the environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...,
    set here), so this imports nothing heavy; torch, when already imported, gets
    ``torch.set_num_threads(n)``, and BLAS libraries already loaded are limited through
    threadpoolctl when it is installed. Returns ``n``."""
    global _threads
    n = default_threads() if n is None else int(n)
    if n < 1:
        from clipzoo.errors import ConfigError

        raise ConfigError(f"bad thread count {n}: use a positive integer")
    for var in _BLAS_ENV:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numpy" in sys.modules:  # BLAS may be loaded already
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(limits=n)
    _threads = n
    return n


def threads() -> int | None:
    """The thread count :func:`set_threads` chose in this process (None: not set)."""
    return _threads
