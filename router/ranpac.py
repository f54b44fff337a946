"""Class-Gaussian routing in a random-feature space (RanPAC), and the class posterior it gives.

RanPAC (McDonnell et al., NeurIPS 2023): frozen features ``x`` are unit-normed and mapped through a
fixed random projection with a ReLU, ``h = relu(x P)`` (``P`` is ``D x M``, Gaussian, regenerated
from a seed), where class Gaussians with one shared covariance separate far better than in the
``D``-dimensional CLIP space. Over every class ``c`` of every known task, with the class means
``m_c`` and the pooled within-class covariance ``S`` of ``h`` (shrunk towards ``tr(S)/M I``), the
LDA score is ``w_c^T h + b_c``, ``w_c = S^-1 m_c``, ``b_c = -1/2 m_c^T S^-1 m_c`` (equal class
priors); its softmax over all classes is ``p(class | x)``.

- **Routing**: ``p(task | x) = sum_{c in task} p(c | x)``; the router's scores are its logarithm.
- **Answering** (:mod:`clipzoo.zoo.predict`): the chosen expert's log-probabilities plus
  ``answer_weight`` times ``log p(c | x, task)`` from the task's own LDA head in the same space
  (its own scatter, shrunk more), computed once when the task is added and stored with it, so
  the answer for a task given never changes as other tasks arrive (oracle forgetting stays 0).

What a task keeps for this (in :class:`clipzoo.router.stats.TaskStats`, no image): its class
means in ``h``-space and a rank-``RANK`` factor ``F`` plus an isotropic remainder ``r`` of its
within-class scatter, ``sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T ~= F F^T + r I``. The router keeps
their running sum, so adding a task costs the same at expert 64 as at expert 2 (one ``M x M``
solve); removing one subtracts its term. The default projection width, rank and shrinkage were
chosen on validation splits carved from training data (README, router section).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipzoo.errors import ConfigError, RegistryError
from clipzoo.router.gate import Routing, top_k
from clipzoo.router.ood import DEFAULT_QUANTILE, OODDetector, detector_from_stats
from clipzoo.router.random_features import (PROJECTION_DIM, PROJECTION_SEED, RANK, class_head, projection,
                                            random_features)
from clipzoo.router.stats import TaskStats


class TaskPosteriors(Mapping):
    """``log p(class | x, task)`` per task name, from the task's own head, computed on first use:
    a batch pays only for the tasks its answers read. One product per task, of the same shapes
    whatever the other tasks, so a task's posterior never depends on them."""

    def __init__(self, h: torch.Tensor, names: list[str], head: Callable[[str], tuple[torch.Tensor, torch.Tensor]]):
        self._h, self._names, self._head, self._done = h, names, head, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._done:
            w, b = self._head(name)
            with torch.no_grad():
                self._done[name] = (self._h @ w.T + b).log_softmax(1)
        return self._done[name]

    def rows(self, name: str, idx: list[int]) -> torch.Tensor:
        """``self[name][idx]``, computed for those rows only (an answer reads each task's
        posterior on the rows routed to it: the batch's cost stays flat in the number of tasks)."""
        if name in self._done or name not in self._names:
            return self[name][idx]
        w, b = self._head(name)
        with torch.no_grad():
            return (self._h[idx] @ w.T + b).log_softmax(1)

    def __contains__(self, name: object) -> bool:  # Mapping's default would compute the posterior
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

KIND = "ranpac"


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


class RanpacRouter:
    """Routes by the class posterior of shared-covariance LDA on random features; OOD by the
    calibrated detector of :mod:`clipzoo.router.ood` (``ood_score > 0`` -> zero-shot fallback)."""

    name = KIND

    def __init__(self, dim: int, config: RanpacConfig = RanpacConfig(), ood_quantile: float = DEFAULT_QUANTILE):
        self.dim, self.config, self.ood_quantile = dim, config, ood_quantile
        self.proj = projection(dim)
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.means = torch.empty(0, PROJECTION_DIM, dtype=torch.float64)     # (K, M) every class of every task
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # each task's own class head (w, b)
        self.scatter = torch.zeros(PROJECTION_DIM, PROJECTION_DIM, dtype=torch.float64)
        self.count = 0.0
        # each task's statistics (its class head, the OOD detector), read on first use: adding a
        # task to a loaded router reads no other task's file
        self._stats: dict[str, TaskStats | None] = {}
        self._reader: Callable[[str], TaskStats] | None = None
        self._ood: OODDetector | None = None
        self.w = self.b = torch.empty(0)
        self.info: dict = {}

    # ----- building and updating -------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: dict[str, TaskStats], config: RanpacConfig = RanpacConfig(),
                   ood_quantile: float = DEFAULT_QUANTILE) -> "RanpacRouter":
        if not stats:
            raise RegistryError("a ranpac router needs at least one task's statistics")
        r = cls(next(iter(stats.values())).class_means.shape[1], config, ood_quantile)
        for n, s in stats.items():
            r._include(n, s)
        r._solve()
        return r

    def _term(self, s: TaskStats) -> torch.Tensor:
        f = s.rp_factor.double()
        return f @ f.T + float(s.rp_rest) * torch.eye(f.shape[0], dtype=torch.float64)

    def _include(self, name: str, s: TaskStats) -> None:
        if name in self.names:
            raise RegistryError(f"the router already has a slot for {name!r}")
        if s.rp_head_w is None:
            raise RegistryError(f"task {name!r} has statistics from an older clipzoo without random-feature "
                                "means: remove the task and add it again, or use --kind learned")
        if s.rp_means.shape[1] != PROJECTION_DIM or s.class_means.shape[1] != self.dim:
            raise ConfigError(f"task {name!r} has {s.class_means.shape[1]}-d features, the router {self.dim}-d")
        self.names.append(name)
        self.sizes.append(len(s.rp_means))
        self.means = torch.cat([self.means, s.rp_means.double()])
        self.scatter += self._term(s)
        self.count += float(s.class_counts.sum())
        self._stats[name] = s
        self._ood = None

    def add(self, name: str, stats: TaskStats) -> None:
        """Add a task's classes and scatter; one ``M x M`` solve whatever the number of tasks."""
        self._include(name, stats)
        self._solve()

    def remove(self, name: str, stats: TaskStats) -> None:
        """Drop a task's classes and subtract its scatter (``stats``: the task's statistics)."""
        if name not in self.names:
            raise RegistryError(f"the router has no slot for {name!r}")
        i = self.names.index(name)
        start = sum(self.sizes[:i])
        self.means = torch.cat([self.means[:start], self.means[start + self.sizes[i]:]])
        self._heads.pop(name, None)
        self.scatter -= self._term(stats)
        self.count -= float(stats.class_counts.sum())
        del self.names[i], self.sizes[i], self._stats[name]
        self._ood = None
        if self.names:
            self._solve()

    def stats(self, name: str) -> TaskStats:
        """Task ``name``'s statistics, read on first use when the router was loaded from a file."""
        if self._stats[name] is None:
            self._stats[name] = self._reader(name)
        return self._stats[name]

    def read_all(self) -> "RanpacRouter":
        """Read every task's statistics and class head now (a reader that must not depend on the
        files staying in place later)."""
        for n in self.names:
            self.head(n)
        return self

    def head(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``name``'s own class head ``(w, b)``: the stored one, or one recomputed with the
        config's ``head_shrinkage`` when set."""
        if name not in self._heads:
            s, hs = self.stats(name), self.config.head_shrinkage
            w, b = (s.rp_head_w, s.rp_head_b) if hs is None else \
                class_head(s.rp_means, s.rp_factor, s.rp_rest, float(s.class_counts.sum()), hs)
            self._heads[name] = (w.float(), b.float())
        return self._heads[name]

    def _solve(self) -> None:
        import time

        t0 = time.perf_counter()
        m, s, n = self.scatter.shape[0], self.config.shrinkage, max(self.count, 1.0)
        cov = self.scatter * ((1 - s) / n)   # (1 - s) S / n + s tr(S / n) / m I, in two passes over M x M
        cov.diagonal().add_(s * float(torch.trace(self.scatter)) / (n * m))
        w = torch.cholesky_solve(self.means.T, torch.linalg.cholesky(cov)).T
        self.w, self.b = w.float(), (-0.5 * (w * self.means).sum(1)).float()
        self.info = {"update_seconds": round(time.perf_counter() - t0, 4), "classes": int(len(self.means))}

    # ----- routing ---------------------------------------------------------------------------
    @property
    def ood(self) -> OODDetector:
        if self._ood is None:
            self._ood = detector_from_stats([self.stats(n) for n in self.names], self.ood_quantile)
        return self._ood

    @torch.no_grad()
    def class_log_posterior(self, feats: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(class | x)`` over every class of every task, ``(B, K)`` in task order."""
        h = random_features(feats, self.proj) if h is None else h
        return (h @ self.w.T + self.b).log_softmax(1)

    def task_scores(self, class_logp: torch.Tensor) -> torch.Tensor:
        """``log p(task | x)`` ``(B, E)`` from :meth:`class_log_posterior`: a log-sum-exp over each
        task's classes, each task's own maximum taken out first (so every task keeps a finite
        score, however far below the best class it is); terms over 80 nats below their task's
        maximum are dropped (a relative change under 1e-34)."""
        task_of = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))  # (K,)
        xt = class_logp.float().T.contiguous()                                                       # (K, B)
        top = torch.full((len(self.sizes), xt.shape[1]), float("-inf")).scatter_reduce_(
            0, task_of[:, None].expand_as(xt), xt, "amax")
        mass = (xt - top[task_of]).clamp_(min=-80).exp_()
        return (torch.zeros_like(top).index_add_(0, task_of, mass).log_() + top).T

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        return self.task_scores(self.class_log_posterior(feats))

    def posteriors(self, feats: torch.Tensor, h: torch.Tensor | None = None) -> TaskPosteriors:
        """Each task's ``log p(class | x, task)``, computed when read (no routing, no OOD score:
        what an answer for a given task needs)."""
        return TaskPosteriors(random_features(feats, self.proj) if h is None else h, list(self.names), self.head)

    def route(self, feats: torch.Tensor, k: int = 1) -> Routing:
        """Top-k tasks by ``p(task | x)``, each input's within-task class posteriors attached."""
        h = random_features(feats, self.proj)
        tasks = self.task_scores(self.class_log_posterior(feats, h))
        r = top_k(tasks, self.names, k)
        r.ood_score = self.ood.score(feats, candidates=r.indices)  # exact decisions, cost flat in the tasks
        r.class_logp = self.posteriors(feats, h)
        r.answer_weight = self.config.answer_weight
        return r

    # ----- files -----------------------------------------------------------------------------
    def save(self, folder: Path, stem: str) -> list[str]:
        """Write ``<stem>.safetensors`` (scatter sum, class means, solved weights) and ``<stem>.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"scatter": self.scatter.float(), "means": self.means.float(), "w": self.w, "b": self.b}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{stem}.safetensors"))
        meta = {"kind": KIND, "names": self.names, "sizes": self.sizes, "count": self.count, "dim": self.dim,
                "projection": {"width": PROJECTION_DIM, "seed": PROJECTION_SEED, "rank": RANK},
                "ood_quantile": self.ood_quantile, "config": asdict(self.config), "last_update": self.info}
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [f"{stem}.safetensors", f"{stem}.json"]

    @classmethod
    def load(cls, weights: Path, meta_file: Path, stats: Callable[[str], TaskStats],
             ood_quantile: float | None = None) -> "RanpacRouter":
        """A router saved by :meth:`save`; ``stats(name)`` reads a task's statistics when its class
        head or the OOD detector first needs them."""
        meta = json.loads(meta_file.read_text())
        if meta.get("projection", {}).get("width") != PROJECTION_DIM:
            raise RegistryError(f"{meta_file} uses another random projection: run 'clipzoo router --rebuild'")
        r = cls(meta["dim"], RanpacConfig.from_dict(meta["config"]),
                meta["ood_quantile"] if ood_quantile is None else ood_quantile)
        state = load_file(str(weights))
        r.names, r.sizes, r.count = list(meta["names"]), list(meta["sizes"]), float(meta["count"])
        r.scatter, r.means = state["scatter"].double(), state["means"].double()
        r.w, r.b = state["w"].float(), state["b"].float()
        r._stats, r._reader = dict.fromkeys(r.names), stats
        r.info = meta.get("last_update", {})
        return r
