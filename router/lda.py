"""The shared-covariance LDA behind the ranpac router, in numpy: the class means of every task,
the running sum of their within-class scatters, and the one ``M x M`` solve that turns them into
class weights (the maths: :mod:`clipzoo.router.ranpac`).

Apart from the routing (torch) so that changing a zoo's set of tasks needs no torch:
``clipzoo remove`` subtracts a task's scatter and re-solves here, reading only numpy arrays. A
process that has torch loaded anyway (adding a task) does the two dense steps through it: the
scatter update in place and a Cholesky solve (half an LU's flops); both give the same weights.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from clipzoo.errors import ConfigError, RegistryError
from clipzoo.router.entry import DEFAULT_QUANTILE, RANPAC

# The random-feature space (:mod:`clipzoo.router.random_features`): its width, the seed of its
# projection and the rank of each task's scatter factor (chosen on validation splits; README, router section).
PROJECTION_DIM = 2048
PROJECTION_SEED = 0
RANK = 64


@dataclass
class RanpacConfig:
    """Settings of the class-Gaussian router (saved in its JSON file)."""

    shrinkage: float = 0.01      # weight of tr(S)/M I in the shared covariance
    answer_weight: float = 0.25  # weight of log p(class | x, task) added to the expert's log-probabilities
    head_shrinkage: float | None = None  # None: each task's stored head; a value: heads rebuilt so (benchmarks)

    def __post_init__(self) -> None:
        if not 0 <= self.shrinkage <= 1 or self.answer_weight < 0:
            raise ConfigError("ranpac shrinkage must be in [0, 1] and answer_weight >= 0")
        if self.head_shrinkage is not None and not 0 <= self.head_shrinkage <= 1:
            raise ConfigError("ranpac head_shrinkage must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict) -> "RanpacConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown ranpac router settings {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Terms:
    """What one task adds to the shared LDA: its class means ``(C, M)``, the factor ``(M, r)`` and
    isotropic remainder of its within-class scatter, its image count and its feature width."""

    means: np.ndarray
    factor: np.ndarray
    rest: float
    count: float
    dim: int

    @classmethod
    def of(cls, name: str, stats: object) -> "Terms":
        """From a :class:`clipzoo.router.stats.TaskStats` or the arrays of its file (terms as they are)."""
        if isinstance(stats, cls):
            return stats
        get = stats.get if isinstance(stats, dict) else lambda k: getattr(stats, k, None)
        if get("rp_head_w") is None:
            raise RegistryError(f"task {name!r} has statistics from an older clipzoo without random-feature "
                                "means: remove the task and add it again, or use --kind learned")
        return cls(np.asarray(get("rp_means"), np.float64), np.asarray(get("rp_factor"), np.float64),
                   float(np.asarray(get("rp_rest"))), float(np.asarray(get("class_counts")).sum()),
                   int(np.asarray(get("class_means")).shape[1]))

    def add_scatter(self, total: np.ndarray, sign: float = 1.0) -> None:
        """``total += sign (F F^T + r I)`` in place (``total``: ``(M, M)`` float64)."""
        torch = _loaded_torch()
        if torch is None:
            total += sign * (self.factor @ self.factor.T)
        else:
            f = torch.tensor(self.factor)  # a copy: the factor may be a read-only view of a file's array
            torch.from_numpy(total).addmm_(f, f.T, alpha=sign)
        total[np.diag_indices_from(total)] += sign * self.rest


def _loaded_torch():
    """torch when this process has already imported it, else None (never imported here:
    ``clipzoo remove`` stays without it)."""
    return sys.modules.get("torch")


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b`` for a symmetric positive definite ``a`` (float64): a Cholesky solve through torch
    when the process has it loaded; numpy's LU otherwise, or when ``a`` is not numerically
    positive definite (no shrinkage and a rank-deficient scatter)."""
    torch = _loaded_torch()
    if torch is not None:
        chol, info = torch.linalg.cholesky_ex(torch.from_numpy(a))
        if int(info) == 0:  # two triangular solves: torch's cholesky_solve measured slower
            y = torch.linalg.solve_triangular(chol, torch.from_numpy(np.ascontiguousarray(b)), upper=False)
            return torch.linalg.solve_triangular(chol.T, y, upper=True).numpy()
    return np.linalg.solve(a, b)


def _row_starts(m: int) -> np.ndarray:
    """Where row ``i`` of an ``(M, M)`` upper triangle (its places ``i..M-1``) starts in the packed vector."""
    return np.concatenate([[0], np.cumsum(np.arange(m, 0, -1))])


def pack_upper(a: np.ndarray) -> np.ndarray:
    """The upper triangle of a symmetric ``(M, M)`` matrix, row by row, float32: half the bytes.
    Copied a row at a time (a boolean mask over ``M^2`` places costs several times more)."""
    m, starts = len(a), _row_starts(len(a))
    out = np.empty(starts[-1], np.float32)
    for i in range(m):
        out[starts[i]:starts[i + 1]] = a[i, i:]
    return out


def unpack_upper(packed: np.ndarray, m: int) -> np.ndarray:
    """The symmetric float64 ``(M, M)`` matrix whose upper triangle :func:`pack_upper` gave: rows
    filled in place, then mirrored a 128 x 128 tile at a time (a whole-matrix transpose reads
    memory with an ``M``-long stride, several times slower)."""
    starts, block = _row_starts(m), 128
    if packed.shape != (starts[-1],):
        raise RegistryError(f"a router file's scatter has {packed.size} values, not the {starts[-1]} of a "
                            f"{m} x {m} triangle: run 'clipzoo router --rebuild'")
    full = np.empty((m, m))
    for i in range(m):
        full[i, i:] = packed[starts[i]:starts[i + 1]]
    for i in range(0, m, block):
        j = min(i + block, m)
        tile = np.triu(full[i:j, i:j])
        full[i:j, i:j] = tile + np.triu(tile, 1).T
        full[j:, i:j] = full[i:j, j:].T
    return full


class SharedLda:
    """Every known task's classes under one shared within-class covariance: add or drop a task's
    :class:`Terms`, then :meth:`solve` (one ``M x M`` solve whatever the number of tasks)."""

    def __init__(self, dim: int, config: RanpacConfig = RanpacConfig(), ood_quantile: float = DEFAULT_QUANTILE):
        self.dim, self.config, self.ood_quantile = dim, config, ood_quantile
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.means = np.empty((0, PROJECTION_DIM))                    # (K, M) every class of every task
        self.scatter = np.zeros((PROJECTION_DIM, PROJECTION_DIM))
        self.count = 0.0
        self.w = np.empty((0, PROJECTION_DIM), np.float32)             # (K, M) class weights
        self.b = np.empty(0, np.float32)                               # (K,)
        self.info: dict = {}

    def include(self, name: str, stats: object) -> None:
        """Add task ``name``'s classes and scatter (``stats``: see :meth:`Terms.of`; call :meth:`solve` after)."""
        t = Terms.of(name, stats)
        if name in self.names:
            raise RegistryError(f"the router already has a slot for {name!r}")
        if t.means.shape[1] != PROJECTION_DIM or t.dim != self.dim:
            raise ConfigError(f"task {name!r} has {t.dim}-d features, the router {self.dim}-d")
        self.names.append(name)
        self.sizes.append(len(t.means))
        self.means = np.concatenate([self.means, t.means])
        t.add_scatter(self.scatter)
        self.count += t.count

    def exclude(self, name: str, stats: object) -> None:
        """Drop task ``name``'s classes and subtract its scatter (``stats``: its own, see :meth:`Terms.of`)."""
        t = Terms.of(name, stats)
        if name not in self.names:
            raise RegistryError(f"the router has no slot for {name!r}")
        i = self.names.index(name)
        start = sum(self.sizes[:i])
        self.means = np.concatenate([self.means[:start], self.means[start + self.sizes[i]:]])
        t.add_scatter(self.scatter, -1.0)
        self.count -= t.count
        del self.names[i], self.sizes[i]

    def solve(self) -> None:
        """Class weights ``w_c = S^-1 m_c`` and biases ``-1/2 m_c^T S^-1 m_c`` of the shrunk shared
        covariance ``S = (1 - s) scatter / n + s tr(scatter / n) / M I``."""
        t0 = time.perf_counter()
        m, s, n = self.scatter.shape[0], self.config.shrinkage, max(self.count, 1.0)
        cov = self.scatter * ((1 - s) / n)
        cov[np.diag_indices(m)] += s * float(np.trace(self.scatter)) / (n * m)
        w = solve_spd(cov, self.means.T).T if len(self.means) else np.empty((0, m))
        self.w, self.b = w.astype(np.float32), (-0.5 * (w * self.means).sum(1)).astype(np.float32)
        self.info = {"update_seconds": round(time.perf_counter() - t0, 4), "classes": int(len(self.means))}

    @classmethod
    def from_stats(cls, stats: dict[str, object], config: RanpacConfig = RanpacConfig(),
                   ood_quantile: float = DEFAULT_QUANTILE) -> "SharedLda":
        """Built from every task's statistics (see :meth:`Terms.of`) and solved."""
        if not stats:
            raise RegistryError("a ranpac router needs at least one task's statistics")
        lda = cls(Terms.of(*next(iter(stats.items()))).dim, config, ood_quantile)
        for n, s in stats.items():
            lda.include(n, s)
        lda.solve()
        return lda

    # ----- files -----------------------------------------------------------------------------
    def save(self, folder: Path, stem: str) -> list[str]:
        """Write ``<stem>.safetensors`` (the scatter sum's upper triangle, class means, solved
        weights) and ``<stem>.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"scatter_upper": pack_upper(self.scatter), "means": self.means.astype(np.float32),
                  "w": self.w, "b": self.b}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / f"{stem}.safetensors"))
        meta = {"kind": RANPAC, "names": self.names, "sizes": self.sizes, "count": self.count, "dim": self.dim,
                "projection": {"width": PROJECTION_DIM, "seed": PROJECTION_SEED, "rank": RANK},
                "ood_quantile": self.ood_quantile, "config": asdict(self.config), "last_update": self.info}
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [f"{stem}.safetensors", f"{stem}.json"]

    @classmethod
    def load(cls, weights: Path, meta_file: Path, ood_quantile: float | None = None) -> "SharedLda":
        """A state saved by :meth:`save` (``ood_quantile``: instead of the saved one)."""
        meta = json.loads(meta_file.read_text())
        if meta.get("projection", {}).get("width") != PROJECTION_DIM:
            raise RegistryError(f"{meta_file} uses another random projection: run 'clipzoo router --rebuild'")
        lda = cls(meta["dim"], RanpacConfig.from_dict(meta["config"]),
                  meta["ood_quantile"] if ood_quantile is None else ood_quantile)
        state = load_file(str(weights))
        lda.names, lda.sizes, lda.count = list(meta["names"]), list(meta["sizes"]), float(meta["count"])
        lda.scatter = unpack_upper(state["scatter_upper"], PROJECTION_DIM) if "scatter_upper" in state \
            else state["scatter"].astype(np.float64)   # files of clipzoo before the packed triangle
        lda.means = state["means"].astype(np.float64)
        lda.w, lda.b = state["w"].astype(np.float32), state["b"].astype(np.float32)
        lda.info = meta.get("last_update", {})
        return lda
