"""A validation split carved from a task's training split, for every choice made before testing.

Stratified per class with a fixed seed: of a class with ``n`` training images,
``k = min(n - 1, max(1, round(fraction * n)))`` go to validation (none when ``n == 1``), chosen by a
numpy ``default_rng(seed)`` permutation of that class's positions; the rest stay for training.
Test splits are never used to choose anything; they only report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from clipzoo.errors import ConfigError
from clipzoo.tasks.spec import Split, TaskData

DEFAULT_FRACTION = 0.1
DEFAULT_SEED = 0


def validation_indices(labels: Sequence[int], fraction: float = DEFAULT_FRACTION,
                       seed: int = DEFAULT_SEED) -> tuple[list[int], list[int]]:
    """(train positions, validation positions) of a training split with these labels, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        k = min(len(pos) - 1, max(1, round(fraction * len(pos))))
        val += [int(i) for i in rng.permutation(pos)[:k]]
    held = set(val)
    return [i for i in range(len(y)) if i not in held], sorted(val)


def validation_split(task: TaskData, fraction: float = DEFAULT_FRACTION,
                     seed: int = DEFAULT_SEED) -> tuple[TaskData, TaskData]:
    """(train_task, val_task): ``train_task`` keeps the training images not carved out and the real
    test split; ``val_task`` has the same reduced training split and the carved images as its
    ``test`` split, so anything that trains on a task and scores its test split can be run on it."""
    tr, va = validation_indices(task.train.labels, fraction, seed)

    def pick(idx: list[int]) -> Split:
        return Split([task.train.images[i] for i in idx], [task.train.labels[i] for i in idx])

    train = pick(tr)
    return replace(task, train=train), replace(task, train=train, test=pick(va))
