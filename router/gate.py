"""Routing: which experts should answer each input.

Every router maps frozen image features ``(B, D)`` to scores ``(B, E)`` over the zoo's experts;
:func:`top_k` turns scores into sparse weights. Every router also carries the calibrated OOD
detector of :mod:`clipzoo.router.ood`: an input whose ``ood_score`` exceeds 0 belongs to no known task and
is marked ``fallback`` (the zoo answers it with zero-shot CLIP). Policies: :class:`NearestStatsRouter`
(here) and the learned :class:`clipzoo.router.learned.SparseRouter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from clipzoo.router.ood import DEFAULT_QUANTILE, OODDetector, detector_from_stats
from clipzoo.router.stats import TaskStats


@dataclass
class Routing:
    """Top-k experts per input: indices ``(B, k)`` into ``names`` and weights summing to 1, and the
    calibrated OOD score ``(B,)`` (``None`` when the router has no detector)."""

    names: list[str]
    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    ood_score: torch.Tensor | None = None
    # per task name, log p(class | x, task) ``(B, C_t)`` when the router models classes (ranpac),
    # added with ``answer_weight`` to the expert's log-probabilities; ``padded(names, groups)``
    # gives each task's routed rows only (clipzoo.router.ranpac.TaskPosteriors)
    class_logp: Mapping[str, torch.Tensor] | None = None
    answer_weight: float = 0.0

    @property
    def fallback(self) -> torch.Tensor:
        """``(B,)`` bool: the input belongs to no known task (``ood_score > 0``)."""
        if self.ood_score is None:
            return torch.zeros(len(self.indices), dtype=torch.bool)
        return self.ood_score > 0

    def as_dicts(self) -> list[dict[str, float]]:
        return [{self.names[i]: round(w, 6) for i, w in zip(idx, wt)}
                for idx, wt in zip(self.indices.tolist(), self.weights.tolist())]


def top_k(scores: torch.Tensor, names: list[str], k: int = 1, ood_score: torch.Tensor | None = None) -> Routing:
    """Softmax over the k best scores of each row (log-likelihood-like scores)."""
    k = max(1, min(k, scores.shape[1]))
    val, idx = scores.topk(k, dim=1)
    return Routing(names, idx, torch.softmax(val, dim=1), scores, ood_score)


class NearestStatsRouter:
    """Each input goes to the task whose Gaussian (mean, shrunk covariance) fits it best.

    Score = Gaussian log-likelihood ``-0.5 * (mahalanobis^2 + log det cov + D log 2pi)``;
    no old images are needed, only each task's :class:`TaskStats`.
    """

    name = "nearest-stats"

    def __init__(self, stats: dict[str, TaskStats], ood_quantile: float = DEFAULT_QUANTILE):
        self.names = list(stats)
        self.ood: OODDetector = detector_from_stats(list(stats.values()), ood_quantile)
        covs = [s.cov.double() for s in stats.values()]
        self._mean = torch.stack([s.mean.float() for s in stats.values()]) if stats else torch.empty(0)
        # the inverse factors (float64 once, float32 after): maha = |W_e (x - mean_e)|^2 for all experts at once
        self._white = torch.stack([torch.linalg.inv(torch.linalg.cholesky(c)).float() for c in covs]) \
            if stats else torch.empty(0)
        self._logdet = torch.stack([torch.linalg.slogdet(c)[1] for c in covs]).float() if stats else torch.empty(0)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Gaussian log-likelihood of each input under each task ``(B, E)``, batched in float32."""
        diff = feats.float()[None] - self._mean[:, None, :]                   # (E, B, D)
        maha = torch.bmm(diff, self._white.transpose(1, 2)).pow(2).sum(2).T   # (B, E)
        d = feats.shape[1]
        return -0.5 * (maha + self._logdet[None] + d * math.log(2 * math.pi))

    def route(self, feats: torch.Tensor, k: int = 1) -> Routing:
        return top_k(self.scores(feats), self.names, k, self.ood.score(feats))
