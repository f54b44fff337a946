"""A task's ``stats.safetensors`` read as numpy arrays: what :class:`clipzoo.router.stats.TaskStats`
loads, and what code that must not import torch (``clipzoo remove``, ``clipzoo verify``) reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from clipzoo.errors import IntegrityError, RegistryError

if TYPE_CHECKING:  # numpy only when a file is read: verify's field list needs none
    import numpy as np

STATS_FILE = "stats.safetensors"
FIELDS = ("mean", "cov", "class_means", "class_counts", "class_cov", "ood_quantiles",
          "rp_means", "rp_factor", "rp_rest", "rp_head_w", "rp_head_b")
OPTIONAL = tuple(f for f in FIELDS if f.startswith("rp_"))  # absent from files of older versions


def read_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The tensors of ``folder/stats.safetensors`` by name; a missing, damaged or foreign file (or
    one lacking a field) is one IntegrityError or RegistryError naming the expert and the fix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    where = f" --zoo {folder.parent.parent} --name {folder.name}" if folder.parent.name == "experts" else ""
    fix = f"restore it (clipzoo pull) or remove the expert (clipzoo remove{where})"
    try:
        arrays = load_file(str(folder / STATS_FILE))
    except FileNotFoundError:
        raise IntegrityError(f"expert {folder.name!r}: {STATS_FILE} is missing; {fix}") from None
    except OSError as e:
        raise IntegrityError(f"expert {folder.name!r}: {STATS_FILE} cannot be read ({e.strerror or e}); {fix}") from e
    except (SafetensorError, ValueError) as e:
        why = " ".join(str(e).split())[:160]
        raise IntegrityError(f"expert {folder.name!r}: {STATS_FILE} is not a valid safetensors file ({why}); "
                             f"{fix}") from e
    missing = sorted(set(FIELDS) - set(OPTIONAL) - set(arrays))
    if missing:
        raise RegistryError(f"{folder / STATS_FILE} lacks {', '.join(missing)} (written by an older clipzoo): "
                            "remove the task and add it again")
    return arrays
