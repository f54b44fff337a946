"""Continual-learning metrics as pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task ``j``'s test set after training step ``i`` (T x T, fractions
in 0..1). Entries with ``j > i`` are accuracies on tasks not learned yet (zero-shot transfer).
Each metric is defined once here, with its formula. Avg, Last and Transfer are in 0..1; BWT and
Forgetting in -1..1: forgetting makes BWT < 0 and Forgetting > 0, and Forgetting >= -BWT always
(the best earlier accuracy is at least the one right after learning). Forgetting is negative only
when a task's final accuracy beats every earlier one (Chaudhry et al. 2018 do not clip it; nor do we).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


# every method entry's aggregated metrics, in report column order (accuracies first, then costs)
METRIC_KEYS = ("avg", "last", "forgetting", "bwt", "transfer", "task_agnostic_acc", "oracle_acc",
               "routing_accuracy", "trainable_params", "stored_params", "train_seconds", "infer_ms_per_image")


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


def avg_accuracy(R: Matrix) -> float:
    """Avg = (1/T) * sum_i A_i (see :func:`seen_accuracy_per_step`): mean over steps of the seen-task mean."""
    return float(np.mean(seen_accuracy_per_step(R)))


def last_accuracy(R: Matrix) -> float:
    """Last = (1/T) * sum_j R[T-1][j]: mean accuracy over all tasks after the final step."""
    return float(_m(R)[-1].mean())


def forgetting(R: Matrix) -> float:
    """Forgetting = (1/(T-1)) * sum_{j<T-1} ( max_{j<=i<T-1} R[i][j] - R[T-1][j] ); 0 when T == 1.

    Positive when accuracy dropped from its best earlier value; not clipped at 0."""
    a = _m(R)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[j:T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R: Matrix) -> float:
    """BWT = (1/(T-1)) * sum_{j<T-1} ( R[T-1][j] - R[j][j] ); negative means forgetting; 0 when T == 1."""
    a = _m(R)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def transfer(R: Matrix) -> float:
    """Transfer (MTIL) = (1/(T-1)) * sum_{j>=1} [ (1/j) * sum_{i<j} R[i][j] ]: accuracy on tasks
    before they are learned; 0 when T == 1."""
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
    """All matrix metrics, rounded to 6 places."""
    return {
        "avg": round(avg_accuracy(R), 6),
        "last": round(last_accuracy(R), 6),
        "forgetting": round(forgetting(R), 6),
        "bwt": round(backward_transfer(R), 6),
        "transfer": round(transfer(R), 6),
    }
