"""Each baseline's own hyper-parameters, chosen on validation data carved from the training splits.

The search runs once per benchmark, on the first two tasks of the given order (the first task
pair: the smallest sequence where a continual regulariser acts), with the benchmark's seed, epochs
and learning rate. Each task's training features are split by
:func:`clipzoo.tasks.validation.validation_indices` (stratified, fixed seed); a candidate learns
both tasks on the remaining features and is scored by its task-agnostic accuracy on the pooled
validation features of the two tasks after the second step (an answer counts only with the right
task and class). The best value wins; ties go to the earlier value in the grid. The benchmark then
trains every method on the full training splits; test splits are never looked at here. The
full-fine-tuning baselines read the same images as pixels, carved by the same indices; their
learning rate ``ft_lr`` is chosen on ``ft-naive`` first and then used while ``ft-zscl`` and
``clip-cite`` choose their distillation weights (with their own ``ft_steps`` budget per task).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from clipzoo.tasks.validation import validation_indices

# method -> (BenchSettings field, grid); the grids are small on purpose (cost)
GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "adapter-ewc": ("ewc_lambda", (1e1, 1e2, 1e3, 1e4)),
    "adapter-lwf": ("lwf_alpha", (0.3, 1.0, 3.0)),
    "adapter-zscl": ("zscl_beta", (0.3, 1.0, 3.0)),
    "slda": ("slda_shrinkage", (1e-4, 1e-2, 1e-1, 0.5)),
    # the fine-tuning baselines: the learning rate on ft-naive (then shared by ft-zscl and clip-cite,
    # which are tuned after it), then each one's distillation weight
    "ft-naive": ("ft_lr", (3e-5, 1e-4, 3e-4)),
    "ft-zscl": ("ft_zscl_weight", (0.3, 1.0, 3.0)),
    "clip-cite": ("ft_cite_weight", (0.3, 1.0, 3.0)),
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
           fraction: float, val_seed: int, seed: int, pixels: list[Feats] | None = None,
           on_choice: Callable[[str, float], None] | None = None) -> dict:
    """Pick each tuned method's value; ``build(method, field, value)`` makes a fresh method for the
    first two tasks. Methods that read pixels (``space == "pixels"``) get ``pixels`` (the same images,
    carved the same way). Methods are tuned in ``GRIDS`` order, and ``on_choice(field, value)`` is
    called after each choice, so a later build can use an earlier choice (``ft_lr``).
    Returns ``{chosen, grids, scores, on, val_sizes, fraction, val_seed, seconds}``."""
    t0 = time.perf_counter()
    pair = [carve(f, fraction, val_seed) for f in feats[:2]]
    pix = [carve(f, fraction, val_seed) for f in pixels[:2]] if pixels is not None else None
    chosen, scores, seconds = {}, {}, {}
    for m in [m for m in GRIDS if m in methods]:
        key, grid = GRIDS[m]
        scores[key], t1 = [], time.perf_counter()
        for v in grid:
            torch.manual_seed(seed)  # the methods' initial weights, as in the benchmark
            method = build(m, key, v)
            scores[key].append(round(val_score(method, pix if getattr(method, "space", "") == "pixels" else pair,
                                               seed), 6))
        chosen[key] = grid[max(range(len(grid)), key=lambda k: (scores[key][k], -k))]
        seconds[key] = round(time.perf_counter() - t1, 3)
        if on_choice is not None:
            on_choice(key, chosen[key])
    return {"chosen": chosen, "grids": {GRIDS[m][0]: list(GRIDS[m][1]) for m in methods if m in GRIDS},
            "scores": scores, "seconds_per_key": seconds, "on": names[:2], "fraction": fraction, "val_seed": val_seed,
            "val_sizes": [[len(p[1]), len(p[3])] for p in pair],
            "criterion": "task-agnostic accuracy on the pooled validation split of the first two tasks",
            "seconds": round(time.perf_counter() - t0, 3)}
