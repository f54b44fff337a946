"""Timing two or more calls against each other on a shared machine: their calls alternate, so a
spell of load falls on all of them alike, and each keeps every time for the caller to reduce
(a median for typical cost, a minimum for the least disturbed one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def alternating(fns: Sequence[Callable[[], object]], rounds: int) -> list[list[float]]:
    """Seconds of each of ``fns`` in each of ``rounds`` rounds (one call of each per round, in
    order), after one untimed warm-up call of each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times
