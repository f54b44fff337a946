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

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from clipzoo.router.entry import RANPAC
from clipzoo.router.gate import Routing, top_k
from clipzoo.router.groups import Groups, pad_stack
from clipzoo.router.lda import RanpacConfig, SharedLda
from clipzoo.router.ood import DEFAULT_QUANTILE, OODDetector, detector_from_stats
from clipzoo.router.random_features import class_head, projection, random_features
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

    def padded(self, names: list[str], g: Groups) -> torch.Tensor:
        """``self[names[j]]`` on the rows of group ``j`` of ``g``, as ``(G, width, C_max)`` (``-inf``
        past a task's classes; zeros for a name the router does not know), computed for those rows
        only in one batched product: an answer reads each task's posterior on the rows routed to
        it, and the batch's cost stays flat in the number of tasks."""
        unknown = [j for j, n in enumerate(names) if n not in self._names]
        none = (self._h.new_zeros(1, self._h.shape[1]), self._h.new_zeros(1))
        heads = [none if j in unknown else self._head(n) for j, n in enumerate(names)]
        w, b = pad_stack([w for w, _ in heads]), pad_stack([b for _, b in heads], float("-inf"))
        with torch.no_grad():
            post = (torch.bmm(g.pad(self._h), w.transpose(1, 2)) + b[:, None, :]).log_softmax(-1)
        if unknown:
            post[unknown] = 0.0
        return post

    def __contains__(self, name: object) -> bool:  # Mapping's default would compute the posterior
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


KIND = RANPAC


class RanpacRouter(SharedLda):
    """Routes by the class posterior of shared-covariance LDA on random features (the state and
    its solve: :class:`clipzoo.router.lda.SharedLda`); OOD by the calibrated detector of
    :mod:`clipzoo.router.ood` (``ood_score > 0`` -> zero-shot fallback)."""

    name = KIND

    def __init__(self, dim: int, config: RanpacConfig = RanpacConfig(), ood_quantile: float = DEFAULT_QUANTILE):
        super().__init__(dim, config, ood_quantile)
        self.proj = projection(dim)
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # each task's own class head (w, b)
        # each task's statistics (its class head, the OOD detector), read on first use: adding a
        # task to a loaded router reads no other task's file
        self._stats: dict[str, TaskStats | None] = {}
        self._reader: Callable[[str], TaskStats] | None = None
        self._ood: OODDetector | None = None
        self._wb: tuple[torch.Tensor, torch.Tensor] | None = None  # torch views of the solved weights

    # ----- building and updating (``from_stats``: :meth:`SharedLda.from_stats`) --------------------
    def include(self, name: str, s: TaskStats) -> None:
        super().include(name, s)
        self._stats[name] = s
        self._ood = None

    def add(self, name: str, stats: TaskStats) -> None:
        """Add a task's classes and scatter; one ``M x M`` solve whatever the number of tasks."""
        self.include(name, stats)
        self.solve()

    def remove(self, name: str, stats: TaskStats) -> None:
        """Drop a task's classes and subtract its scatter (``stats``: the task's statistics)."""
        self.exclude(name, stats)
        self._heads.pop(name, None)
        del self._stats[name]
        self._ood = None
        if self.names:
            self.solve()

    def solve(self) -> None:
        super().solve()
        self._wb = None

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

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The solved class weights ``(K, M)`` and biases ``(K,)`` as torch tensors (shared memory)."""
        if self._wb is None:
            self._wb = torch.from_numpy(self.w), torch.from_numpy(self.b)
        return self._wb

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
        w, b = self.weights
        return (h @ w.T + b).log_softmax(1)

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
    @classmethod
    def load(cls, weights: Path, meta_file: Path, stats: Callable[[str], TaskStats],
             ood_quantile: float | None = None) -> "RanpacRouter":
        """A router saved by :meth:`SharedLda.save`; ``stats(name)`` reads a task's statistics when
        its class head or the OOD detector first needs them."""
        r = super().load(weights, meta_file, ood_quantile)
        r._stats, r._reader = dict.fromkeys(r.names), stats
        return r
