"""``slda``: a training-free class-Gaussian classifier built from per-task statistics (streaming LDA).

The statistics are the kind the zoo keeps per task instead of images (:mod:`clipzoo.router.stats`):
class means ``mu_c``, class counts ``n_c`` and the task's pooled within-class covariance
``S_t = (1/n_t) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` (unshrunk here, so that tasks combine
exactly). After each task (no task ids, no gradient step, no image kept):

- ``Sigma = sum_t n_t S_t / sum_t n_t`` (one covariance shared by all seen classes),
- ``Sigma_s = (1 - s) Sigma + s (tr(Sigma) / D) I`` (shrinkage ``s`` towards a scaled identity),
- ``score_c(x) = mu_c^T Sigma_s^-1 x - 1/2 mu_c^T Sigma_s^-1 mu_c`` (LDA, equal class priors),

and the answer is the argmax over the union of every seen task's classes (Hayes & Kanan 2020 build
the same classifier one sample at a time; adding a task's sufficient statistics gives the same
means and covariance). It cannot score classes it has no statistics for: for a task not learned yet
(the upper triangle) it answers as frozen zero-shot CLIP does with that task's class names, which
is what the harness gives every method for an unseen task's class names.
"""

from __future__ import annotations

import time

import torch

Pred = tuple[torch.Tensor, torch.Tensor]
Data = list[tuple[torch.Tensor, torch.Tensor]]


def task_statistics(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``means (C, D)``, ``counts (C,)`` and the pooled within-class covariance ``cov (D, D)``
    (maximum likelihood, float64) of one task's features ``x`` with labels ``y`` in ``0..C-1``."""
    x = x.double()
    counts = torch.bincount(y, minlength=num_classes).double()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    means = sums / counts.clamp(min=1)[:, None]
    r = x - means[y]
    return {"means": means, "counts": counts, "cov": r.T @ r / max(1, len(y))}


class SLDA:
    """Streaming LDA over all seen classes from per-task statistics (see the module docstring)."""

    name = "slda"
    note = ("training-free LDA over the union of seen classes from per-task class means, counts and "
            "pooled covariance (no task ids, no images kept); unseen tasks: zero-shot CLIP on their class names")

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, shrinkage: float = 1e-2):
        self.class_embs, self.scale, self.shrinkage = class_embs, logit_scale, shrinkage
        self.stats: list[dict[str, torch.Tensor]] = []
        self._w: torch.Tensor | None = None  # (sum C, D) = Sigma_s^-1 mu_c for every seen class
        self._b: torch.Tensor | None = None

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        self.stats.append(task_statistics(x, y, len(self.class_embs[t])))
        self._fit()
        return {"train_seconds": time.perf_counter() - t0}

    def covariance(self) -> torch.Tensor:
        """The shrunk shared covariance ``Sigma_s`` of every seen task."""
        n = [float(s["counts"].sum()) for s in self.stats]
        cov = sum(ni * s["cov"] for ni, s in zip(n, self.stats)) / sum(n)
        d = cov.shape[0]
        return (1 - self.shrinkage) * cov + self.shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)

    def _fit(self) -> None:
        mu = torch.cat([s["means"] for s in self.stats])
        w = torch.linalg.solve(self.covariance(), mu.T).T
        self._w, self._b = w, -0.5 * (w * mu).sum(1)

    def _scores(self, x: torch.Tensor, tasks: list[int]) -> tuple[torch.Tensor, list[int]]:
        sizes = [len(self.stats[t]["counts"]) for t in range(len(self.stats))]
        start = [sum(sizes[:t]) for t in range(len(sizes))]
        rows = torch.cat([torch.arange(start[t], start[t] + sizes[t]) for t in tasks])
        return x.double() @ self._w[rows].T + self._b[rows], [sizes[t] for t in tasks]

    @torch.no_grad()
    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        scores, sizes = self._scores(x, seen)
        flat = scores.argmax(1)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        block = torch.searchsorted(offsets[1:], flat, right=True)
        return torch.tensor(seen)[block], flat - offsets[block]

    @torch.no_grad()
    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self._scores(x, [t])[0].argmax(1)

    @torch.no_grad()
    def unseen(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """No statistics for task ``t`` yet: frozen CLIP's zero-shot answer over its class names."""
        return (x @ self.class_embs[t].T).argmax(1)

    def trainable_params(self) -> int:
        return 0

    def stored_params(self) -> int:
        """Class means and counts of every seen class, plus one running D x D covariance."""
        if not self.stats:
            return 0
        d = self.stats[0]["cov"].shape[0]
        return sum(int(s["means"].numel() + s["counts"].numel()) for s in self.stats) + d * d

    def stored_images(self) -> int:
        return 0

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{t}": v.clone() for t, s in enumerate(self.stats) for k, v in s.items()}

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        """Back to the statistics of the ``len(data)`` finished tasks (read from ``state``)."""
        self.stats = [{k: state[f"{k}.{t}"] for k in ("means", "counts", "cov")} for t in range(len(data))]
        if self.stats:
            self._fit()
