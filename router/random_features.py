"""The fixed random-feature map of RanPAC (McDonnell et al., NeurIPS 2023) and the per-task
statistics kept in its space: class means, a low-rank factor of the within-class scatter and the
task's own class head (see :mod:`clipzoo.router.ranpac` for how the router uses them)."""

from __future__ import annotations

import numpy as np
import torch

from clipzoo.router.lda import PROJECTION_DIM, PROJECTION_SEED, RANK

HEAD_SHRINKAGE = 0.3  # of a task's own class head (chosen on validation splits; README, router section)


def projection(dim: int, width: int = PROJECTION_DIM, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """The fixed ``dim x width`` Gaussian projection, float32, from numpy's PCG64 stream (the same
    on every machine, so statistics computed anywhere match)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.standard_normal((dim, width), dtype=np.float32))


def random_features(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``relu(normalize(x) @ P)`` in float32: ``(B, M)`` (the ReLU in place: no second ``B x M`` buffer)."""
    return (torch.nn.functional.normalize(x.float(), dim=-1) @ proj).relu_()


def scatter_factor(h: torch.Tensor, labels: torch.Tensor, num_classes: int, rank: int = RANK
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class means ``(C, M)`` of random features ``h``, a factor ``(M, rank)`` and the isotropic
    remainder ``()`` of their within-class scatter (see the module docstring), float64."""
    h = h.double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    means = torch.zeros(num_classes, h.shape[1], dtype=h.dtype).index_add_(0, labels, h) / counts.clamp(min=1)[:, None]
    r = h - means[labels]
    k = min(rank, *r.shape)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its own random start: seeded, caller's state kept
        torch.manual_seed(0)
        _, s, v = torch.svd_lowrank(r, q=min(k + 8, *r.shape), niter=3)
    factor = torch.zeros(h.shape[1], rank, dtype=h.dtype)  # fixed shape whatever the number of images
    factor[:, :k] = v[:, :k] * s[:k]
    rest = (r.pow(2).sum() - s[:k].pow(2).sum()).clamp(min=0) / h.shape[1]
    return means, factor, rest


def class_head(means: torch.Tensor, factor: torch.Tensor, rest: torch.Tensor, count: float,
               shrinkage: float = HEAD_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's own LDA head in random-feature space: ``(C, M)`` weights and ``(C,)`` biases from its
    class means and scatter factor, the covariance shrunk towards ``tr/M I`` by ``shrinkage``.
    Fixed when the task is added, so the zoo's answer for a task given never changes later."""
    f, b = factor.double(), means.double().T
    m, n = f.shape[0], max(count, 1.0)
    # cov = a I + U U^T (U = f sqrt((1 - s) / n)): solved by Woodbury with a rank x rank system,
    # the same head as a dense M x M Cholesky at a fraction of the cost
    trace = (f.pow(2).sum() + float(rest) * m) / n
    a = float(((1 - shrinkage) * float(rest) / n + shrinkage * trace / m).clamp(min=1e-12))
    u = f * ((1 - shrinkage) / n) ** 0.5
    inner = a * torch.eye(u.shape[1], dtype=torch.float64) + u.T @ u
    w = ((b - u @ torch.linalg.solve(inner, u.T @ b)) / a).T
    return w, -0.5 * (w * means.double()).sum(1)
