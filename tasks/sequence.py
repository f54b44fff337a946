"""Task sequences: which domains, in which orders, and the held-out domain for OOD checks."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import numpy as np

from clipzoo.tasks.data import builtin_domains, load_builtin, load_imagefolder, load_task
from clipzoo.tasks.spec import Split, TaskData
from clipzoo.errors import ConfigError, DataError


def expand_domains(paths: list[str]) -> list[Path]:
    """ImageFolder domain directories; a directory without ``train/`` whose subdirectories have one
    (e.g. a data root holding several domains) stands for all of them, sorted by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "train").is_dir():
            kids = sorted(d for d in p.iterdir() if d.is_dir() and (d / "train").is_dir())
            if not kids:
                raise DataError(f"{p} is neither a domain (no {p}/train) nor a folder of domains")
            out += kids
        else:
            out.append(p)
    return out


def load_sequence(domains: list[str], builtin: str | None = None) -> list[TaskData]:
    """The built-in synthetic domains (with ``builtin='synthetic'``), then the ImageFolder domains in order."""
    seq = [load_builtin(d) for d in builtin_domains()] if builtin == "synthetic" else []
    seq += [load_imagefolder(d) for d in expand_domains(domains)]
    names = [t.name for t in seq]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task names must be unique in a sequence, repeated: {', '.join(dup)}")
    if len(seq) < 2:
        raise ConfigError("a benchmark needs at least 2 tasks: give DOMAIN_DIRs or --builtin synthetic")
    return seq


def split_holdout(seq: list[TaskData], holdout: str | None) -> tuple[list[TaskData], TaskData | None]:
    """Take the held-out domain out of the sequence (by task name), or load it (a directory or
    ``builtin:<domain>``); it is never trained on, only used to measure OOD fallback."""
    if holdout is None:
        return seq, None
    names = [t.name for t in seq]
    if holdout in names:
        rest = [t for t in seq if t.name != holdout]
        held = seq[names.index(holdout)]
    else:
        rest, held = seq, load_task(holdout)
        if held.name in names:
            raise ConfigError(f"held-out domain {held.name!r} is also in the sequence: it must stay unseen")
    if len(rest) < 2:
        raise ConfigError("a benchmark needs at least 2 tasks besides the held-out domain")
    return rest, held


def task_orders(n_tasks: int, n_orders: int, seed: int) -> list[list[int]]:
    """``n_orders`` distinct orders of ``range(n_tasks)``: the given order first, then random
    permutations drawn with ``seed`` (numpy's default generator), so the same seed gives the same orders."""
    if n_orders < 1:
        raise ConfigError(f"--orders must be >= 1, got {n_orders}")
    if n_orders > math.factorial(n_tasks):
        raise ConfigError(f"{n_tasks} tasks have only {math.factorial(n_tasks)} orders, not {n_orders}")
    rng = np.random.default_rng(seed)
    orders = [list(range(n_tasks))]
    while len(orders) < n_orders:
        p = [int(i) for i in rng.permutation(n_tasks)]
        if p not in orders:
            orders.append(p)
    return orders


def class_pair_tasks(tasks: list[TaskData], n: int) -> list[TaskData]:
    """``n`` distinct two-class tasks cut from ``tasks`` (labels renumbered), in turn over the
    tasks, each task's disjoint pairs first (``shapes-0-1``, ``colours-0-1``, ...): many distinct
    tasks from a few domains, for the cost benchmarks, whose router then spreads a mixed batch
    over many experts."""

    def part(split: Split, keep: tuple[int, ...]) -> Split:
        pos = {c: i for i, c in enumerate(keep)}
        return Split([im for im, y in zip(split.images, split.labels) if y in pos],
                     [pos[y] for y in split.labels if y in pos])

    per_domain = []
    for t in tasks:
        first = [(c, c + 1) for c in range(0, len(t.classes) - 1, 2)]
        per_domain.append([(t, p) for p in first + [p for p in combinations(range(len(t.classes)), 2) if p not in first]])
    order = [x for row in zip(*per_domain) for x in row] + [x for row in per_domain for x in row[min(map(len, per_domain)):]]
    return [TaskData(f"{t.name}-{a}-{b}", [t.classes[a], t.classes[b]], part(t.train, (a, b)), part(t.test, (a, b)),
                     t.templates) for t, (a, b) in order[:n]]
