"""Out-of-distribution score: does an input belong to any known task?

Per task ``t``: ``d_t(x) = min_c (x - mu_c)^T Sigma_t^-1 (x - mu_c)``, the class-conditional
Mahalanobis distance (Lee et al., 2018) under the task's pooled within-class shrunk covariance.
Calibration needs no other task's data: at add time the task's training features are split into
folds; each fold is scored by statistics fitted on the others, and the quantiles of those held-out
in-distribution scores are stored with the task (``TaskStats.ood_quantiles``, 101 points).

The score is the best class-conditional Gaussian fit over all tasks, in units of ``-2 log p``:
``s(x) = min_t (d_t(x) + log det Sigma_t)`` (the log-determinant keeps a broad task from
claiming everything; on real domains it ranks OOD inputs far better than ``min_t d_t`` or per-task
normalised distances). The threshold ``tau(q)`` is solved from the stored held-out quantiles so
that, averaged over the known tasks, a held-out input of a known task exceeds it with probability
``1 - q`` (an upper bound: ``s(x) <= d_own(x) + log det Sigma_own``). ``ood_score = s(x) - tau(q)``;
an input with ``ood_score > 0`` falls back to zero-shot CLIP.
"""

from __future__ import annotations

import numpy as np
import torch

from clipzoo.router.entry import DEFAULT_QUANTILE, check_quantile
from clipzoo.router.shrinkage import ledoit_wolf

QUANTILES = torch.linspace(0, 1, 101, dtype=torch.float64)

def class_gaussians(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means ``(C, D)`` (the overall mean for an empty class) and the pooled within-class
    Ledoit-Wolf shrunk covariance ``(D, D)``."""
    means = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(num_classes)])
    cov = ledoit_wolf(torch.from_numpy(x - means[y]), assume_centered=True).numpy()
    return means, cov


def whiten(x: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Rows ``x (B, D)`` whitened by the covariance ``chol @ chol.T``: ``chol^-1 x``."""
    return torch.linalg.solve_triangular(chol.double(), x.double().T, upper=False).T


def class_mahalanobis(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances ``(B, C)`` of rows ``x (B, D)`` to ``means (C, D)`` under the
    covariance ``chol @ chol.T``."""
    return torch.cdist(whiten(x, chol), whiten(means, chol)).pow(2)


def min_class_mahalanobis(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``min_c`` of :func:`class_mahalanobis`: ``(B,)``."""
    return class_mahalanobis(x, means, chol).min(1).values


def _distances(y: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Squared distances from products ``y`` ``(..., D + C)`` of :meth:`OODDetector._bank`'s maps and
    the classes' squared norms ``sq`` ``(..., C)``: ``(..., C)``."""
    d = y.shape[-1] - sq.shape[-1]
    return (y[..., :d].pow(2).sum(-1, keepdim=True) - 2 * y[..., d:] + sq).clamp_(min=0)


def heldout_quantiles(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int = 5,
                      seed: int = 0) -> torch.Tensor:
    """Quantiles (at :data:`QUANTILES`) of ``d(x)`` on held-out folds of a task's own features."""
    x, y = feats.double().numpy(), labels.numpy()
    folds = max(2, min(folds, len(x)))
    fold_of = np.random.default_rng(seed).permutation(len(x)) % folds
    scores = []
    for f in range(folds):
        fit, held = fold_of != f, fold_of == f
        means, cov = class_gaussians(x[fit], y[fit], num_classes)
        chol = torch.linalg.cholesky(torch.from_numpy(cov))
        scores.append(min_class_mahalanobis(torch.from_numpy(x[held]), torch.from_numpy(means), chol))
    return torch.quantile(torch.cat(scores), QUANTILES)


class OODDetector:
    """Calibrated OOD score over the known tasks (see the module docstring).

    Scoring is in float32 from one map per task (:meth:`_bank`: the inverse Cholesky factor and the
    whitened class means), stacked ``(E, D + C_max, D)``: one batched product scores every input
    under every task, and the routed candidates cost one product per task reached."""

    def __init__(self, class_means: list[torch.Tensor], chols: list[torch.Tensor], quantiles: list[torch.Tensor],
                 q: float = DEFAULT_QUANTILE):
        self.class_means, self.chols, self.quantiles = class_means, chols, quantiles
        self._maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.logdets = torch.stack([2 * torch.log(torch.diagonal(c.double())).sum() for c in chols]) if chols \
            else torch.empty(0, dtype=torch.float64)
        self.q = q

    @property
    def q(self) -> float:
        return self._q

    @q.setter
    def q(self, q: float) -> None:
        self._q = check_quantile(q)
        self.threshold = self._solve_threshold(q) if self.chols else float("inf")

    def false_fallback_rate(self, tau: float) -> float:
        """Mean over tasks of the held-out share of the task's inputs with ``d_t + log det > tau``."""
        grid = QUANTILES.numpy()
        return float(np.mean([1 - np.interp(tau - ld, qt.double().numpy(), grid)
                              for qt, ld in zip(self.quantiles, self.logdets.tolist())]))

    def _solve_threshold(self, q: float) -> float:
        lo = min(float(qt[0]) + ld for qt, ld in zip(self.quantiles, self.logdets.tolist()))
        hi = max(float(qt[-1]) + ld for qt, ld in zip(self.quantiles, self.logdets.tolist()))
        for _ in range(60):  # bisection: the rate falls as tau grows
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.false_fallback_rate(mid) > 1 - q else (lo, mid)
        return hi

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per task ``t``, a centre ``c_t`` (the mean of its class means) ``(E, D)``, the map ``A_t``
        ``(D + C_max, D)`` with ``(x - c_t) @ A_t.T = [w, w . m_k for each class k]`` for
        ``w = L_t^-1 (x - c_t)`` and the whitened class means ``m_k = L_t^-1 (mu_k - c_t)``, and
        ``|m_k|^2`` ``(E, C_max)`` (``inf`` past a task's classes): one product per task gives the
        distances to all its classes, ``|w|^2 - 2 w . m_k + |m_k|^2``, the centring keeping float32
        from cancelling large terms. Computed once in float64 and kept in float32."""
        if self._maps is None:
            d, c_max = self.chols[0].shape[0], max(len(m) for m in self.class_means)
            centres = torch.stack([m.double().mean(0) for m in self.class_means])
            bank = torch.zeros(len(self.chols), d + c_max, d)
            sq = torch.full((len(self.chols), c_max), float("inf"))
            eye = torch.eye(d, dtype=torch.float64)
            for e, (m, c) in enumerate(zip(self.class_means, self.chols)):
                white = torch.linalg.solve_triangular(c.double(), eye, upper=False)
                wm = (m.double() - centres[e]) @ white.T
                bank[e, :d], bank[e, d:d + len(m)], sq[e, :len(m)] = white, wm @ white, wm.pow(2).sum(1)
            self._maps = (centres.float(), bank, sq)
        return self._maps

    def padded_distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances of every input to every task's classes ``(E, B, C_max)``
        (``inf`` on padded classes), float32, all tasks at once."""
        centres, bank, sq = self._bank()
        return _distances(torch.matmul(feats.float()[None] - centres[:, None], bank.transpose(1, 2)), sq[:, None, :])

    def distances(self, feats: torch.Tensor, padded: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per task, the squared Mahalanobis distances to its classes ``(B, C_t)``."""
        d = self.padded_distances(feats) if padded is None else padded
        return [d[e, :, :len(m)] for e, m in enumerate(self.class_means)]

    def task_scores(self, feats: torch.Tensor, padded: torch.Tensor | None = None) -> torch.Tensor:
        """``d_t(x) + log det Sigma_t`` for every task: ``(B, E)`` (``-2 log p`` up to a constant).
        ``padded`` reuses :meth:`padded_distances` already computed for ``feats``."""
        d = self.padded_distances(feats) if padded is None else padded
        return d.min(2).values.T + self.logdets.float()[None]

    def score(self, feats: torch.Tensor, padded: torch.Tensor | None = None,
              candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``ood_score``: higher is more out-of-distribution; ``> 0`` falls back.

        ``candidates`` ``(B, m)`` (task indices, e.g. the router's top-k) scores those tasks first:
        a row that one of them fits (score ``<= 0``) keeps that score, an upper bound of the exact
        one and still ``<= 0``; every other row is scored over all tasks. The fallback decision is
        the exact one either way, the exact score is kept wherever it is ``> 0``, and the cost per
        in-distribution input no longer grows with the number of tasks."""
        if not self.chols:
            return torch.full((len(feats),), float("inf"))
        if candidates is None:
            return self.task_scores(feats, padded).min(1).values - float(self.threshold)
        s = self._candidate_scores(feats, candidates) - float(self.threshold)
        undecided = (s > 0).nonzero()[:, 0]
        if len(undecided):
            s[undecided] = self.score(feats[undecided])
        return s

    def _candidate_scores(self, feats: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``min`` over each row's candidate tasks of ``d_t(x) + log det Sigma_t``: ``(B,)``. The
        (row, candidate) pairs are sorted by task and each task's rows go through one product with
        its own map, read in place: copying the maps of every task a batch reaches into one
        batched operand would move ``D x D`` floats per task for a product of a few rows. The rows
        are centred in one operation before the loop."""
        centres, bank, sq = self._bank()
        task = candidates.reshape(-1)
        order = torch.argsort(task, stable=True)
        task, rows = task[order], order // candidates.shape[1]
        x = feats.float()[rows] - centres[task]
        y = x.new_empty(len(x), bank.shape[1])
        tasks, counts = torch.unique_consecutive(task, return_counts=True)
        start = 0
        for t, n in zip(tasks.tolist(), counts.tolist()):  # map @ x.T: the map streams through once, unpacked
            y[start:start + n] = (bank[t] @ x[start:start + n].T).T  # not x @ map.T: slower at 512-d
            start += n
        d = _distances(y, sq[task]).min(1).values + self.logdets.float()[task]
        return torch.full((len(feats),), float("inf")).scatter_reduce_(0, rows, d, "amin")

    def is_ood(self, feats: torch.Tensor) -> torch.Tensor:
        return self.score(feats) > 0


def detector_from_stats(stats: list, q: float = DEFAULT_QUANTILE) -> OODDetector:
    """An :class:`OODDetector` from :class:`clipzoo.router.stats.TaskStats` objects, in expert order."""
    return OODDetector([s.class_means for s in stats], [torch.linalg.cholesky(s.class_cov.double()) for s in stats],
                       [s.ood_quantiles for s in stats], q)
