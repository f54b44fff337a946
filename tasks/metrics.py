"""Continual-learning metrics as pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task ``j``'s test set after training step ``i`` (T x T, fractions
in 0..1). Entries with ``j > i`` are accuracies on tasks not learned yet (zero-shot transfer).
Each metric is defined once here, with its formula and its source:

- ``avg_mtil``, ``last``, ``transfer``: the MTIL protocol of ZSCL (Zheng et al., 2023), "Avg",
  "Last" and "Transfer";
- ``avg_inc``: average incremental accuracy (Rebuffi et al., 2017, iCaRL);
- ``forgetting``: Chaudhry et al., 2018 (RWalk), not clipped at 0;
- ``bwt``: backward transfer (Lopez-Paz & Ranzato, 2017, GEM).

Avg, Last and Transfer are in 0..1; BWT and Forgetting in -1..1: forgetting makes BWT < 0 and
Forgetting > 0, and Forgetting >= -BWT always (the best earlier accuracy is at least the one right
after learning). Forgetting is negative only when a task's final accuracy beats every earlier one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]

# the keys summary() returns, in report column order
MATRIX_KEYS = ("avg_mtil", "avg_inc", "last", "forgetting", "bwt", "transfer")
# every method entry's aggregated metrics, in report column order (accuracies first, then costs)
METRIC_KEYS = MATRIX_KEYS + ("task_agnostic_acc", "oracle_acc", "routing_accuracy",
                             "trainable_params", "stored_params", "train_seconds", "infer_ms_per_image")
# where each matrix metric comes from (REPORT_SCHEMA.md and report.md cite these)
SOURCES = {"avg_mtil": "ZSCL (Zheng et al., 2023), MTIL 'Avg'",
           "avg_inc": "Rebuffi et al., 2017 (iCaRL), average incremental accuracy",
           "last": "ZSCL (Zheng et al., 2023), MTIL 'Last'",
           "forgetting": "Chaudhry et al., 2018",
           "bwt": "Lopez-Paz & Ranzato, 2017",
           "transfer": "ZSCL (Zheng et al., 2023), MTIL 'Transfer'"}


def accuracy(pred, true) -> float:
    """Share of positions where ``pred`` equals ``true`` (two equal-length tensors); 0.0 when empty."""
    return float((pred == true).float().mean()) if len(true) else 0.0


def _m(R: Matrix) -> np.ndarray:
    a = np.asarray(R, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {a.shape}")
    return a


def seen_accuracy_per_step(R: Matrix) -> list[float]:
    """A_i = (1/(i+1)) * sum_{j<=i} R[i][j]: mean accuracy over the tasks seen after step i."""
    a = _m(R)
    return [float(a[i, : i + 1].mean()) for i in range(len(a))]


def avg_inc(R: Matrix) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017): avg_inc = (1/T) * sum_i A_i, with A_i
    the seen-task mean after step i (:func:`seen_accuracy_per_step`); lower triangle only."""
    return float(np.mean(seen_accuracy_per_step(R)))


def avg_mtil(R: Matrix) -> float:
    """MTIL "Avg" (ZSCL, Zheng et al. 2023): avg_mtil = (1/T^2) * sum_i sum_j R[i][j], the mean of
    all T x T entries, the upper (not yet learned, zero-shot) triangle included."""
    return float(_m(R).mean())


def last_accuracy(R: Matrix) -> float:
    """Last (ZSCL) = (1/T) * sum_j R[T-1][j]: mean accuracy over all tasks after the final step."""
    return float(_m(R)[-1].mean())


def forgetting(R: Matrix) -> float:
    """Forgetting (Chaudhry et al. 2018) = (1/(T-1)) * sum_{j<T-1} ( max_{j<=i<T-1} R[i][j] - R[T-1][j] );
    0 when T == 1. Positive when accuracy dropped from its best earlier value; not clipped at 0."""
    a = _m(R)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[j:T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R: Matrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017) = (1/(T-1)) * sum_{j<T-1} ( R[T-1][j] - R[j][j] ); negative
    means forgetting; 0 when T == 1."""
    a = _m(R)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def transfer(R: Matrix) -> float:
    """Transfer (ZSCL's MTIL) = (1/(T-1)) * sum_{j>=1} [ (1/j) * sum_{i<j} R[i][j] ]: accuracy on
    tasks before they are learned; 0 when T == 1."""
    a = _m(R)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[:j, j].mean() for j in range(1, T)]))


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and population standard deviation of the non-None values (over orders and seeds)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(float(v.mean()), 6), "std": round(float(v.std()), 6), "n": int(len(v))}


def summary(R: Matrix) -> dict[str, float]:
    """All matrix metrics (the keys of :data:`MATRIX_KEYS`), rounded to 6 places."""
    fns = {"avg_mtil": avg_mtil, "avg_inc": avg_inc, "last": last_accuracy, "forgetting": forgetting,
           "bwt": backward_transfer, "transfer": transfer}
    return {k: round(fns[k](R), 6) for k in MATRIX_KEYS}
