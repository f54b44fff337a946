"""Each baseline's own hyper-parameter, chosen on validation data carved from the training splits.

The search runs once per benchmark, on the first two tasks of the given order (the first task
pair: the smallest sequence where a continual regulariser acts), with the benchmark's seed, epochs
and learning rate. Each task's training features are split by
:func:`clipzoo.tasks.validation.validation_indices` (stratified, fixed seed); a candidate learns
both tasks on the remaining features and is scored by its task-agnostic accuracy on the pooled
validation features of the two tasks after the second step (an answer counts only with the right
task and class). The best value wins; ties go to the earlier value in the grid. The benchmark then
trains every method on the full training splits; test splits are never looked at here.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from clipzoo.tasks.validation import validation_indices

# method -> (BenchSettings field, grid); the grids are small on purpose (cost)
GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ewc": ("ewc_lambda", (1e1, 1e2, 1e3, 1e4)),
    "lwf": ("lwf_alpha", (0.3, 1.0, 3.0)),
    "zscl": ("zscl_beta", (0.3, 1.0, 3.0)),
    "slda": ("slda_shrinkage", (1e-4, 1e-2, 1e-1, 0.5)),
}

Feats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def carve(feat: Feats, fraction: float, seed: int) -> Feats:
    """(train features, labels, validation features, labels) from a task's training features."""
    x, y = feat[0], feat[1]
    tr, va = validation_indices(y.tolist(), fraction, seed)
    return x[tr], y[tr], x[va], y[va]


def val_score(method, pair: list[Feats], seed: int) -> float:
    """Task-agnostic accuracy on the pooled validation features after learning both tasks."""
    for i, f in enumerate(pair):
        torch.manual_seed(seed * 1000 + i)  # as the benchmark seeds its steps
        method.learn(i, f[0], f[1])
    ok = n = 0
    for j, f in enumerate(pair):
        t, c = method.agnostic(f[2], list(range(len(pair))))
        ok += int(((t == j) & (c == f[3])).sum())
        n += len(f[3])
    return ok / max(1, n)


def choose(build: Callable[[str, str, float], object], methods: list[str], feats: list[Feats], names: list[str],
           fraction: float, val_seed: int, seed: int) -> dict:
    """Pick each tuned method's value; ``build(method, field, value)`` makes a fresh method for the
    first two tasks. Returns ``{chosen, grids, scores, on, val_sizes, fraction, val_seed, seconds}``."""
    t0 = time.perf_counter()
    pair = [carve(f, fraction, val_seed) for f in feats[:2]]
    chosen, scores = {}, {}
    for m in methods:
        if m not in GRIDS:
            continue
        key, grid = GRIDS[m]
        scores[key] = []
        for v in grid:
            torch.manual_seed(seed)  # the methods' initial weights, as in the benchmark
            scores[key].append(round(val_score(build(m, key, v), pair, seed), 6))
        chosen[key] = grid[max(range(len(grid)), key=lambda k: (scores[key][k], -k))]
    return {"chosen": chosen, "grids": {GRIDS[m][0]: list(GRIDS[m][1]) for m in methods if m in GRIDS},
            "scores": scores, "on": names[:2], "fraction": fraction, "val_seed": val_seed,
            "val_sizes": [[len(p[1]), len(p[3])] for p in pair],
            "criterion": "task-agnostic accuracy on the pooled validation split of the first two tasks",
            "seconds": round(time.perf_counter() - t0, 3)}
