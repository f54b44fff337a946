"""Per-task statistics of frozen image features, kept in the zoo instead of old raw images.

For each task: the task mean and a Ledoit-Wolf shrunk covariance of its training features,
plus per-class means and counts and the pooled within-class shrunk covariance (what a router
needs to sample pseudo-features of old tasks later), and the quantiles of held-out
in-distribution OOD scores that calibrate the fallback (:mod:`clipzoo.router.ood`), and the class
means and scatter factor in the random-feature space the default router scores in
(:mod:`clipzoo.router.ranpac`). Stored as
``stats.safetensors``, float32 (the quantiles float64); computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from clipzoo.router.ood import class_gaussians, heldout_quantiles
from clipzoo.router.random_features import class_head, projection, random_features, scatter_factor
from clipzoo.router.shrinkage import ledoit_wolf
from clipzoo.router.stats_file import STATS_FILE, read_arrays



def pseudo_features(means: torch.Tensor, chol: torch.Tensor, cls: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm samples of the class Gaussians ``N(means[c], chol @ chol.T)`` for the classes
    ``cls``, in ``chol``'s dtype: what routers and fusion train on instead of old tasks' images."""
    z = torch.randn(len(cls), chol.shape[0], generator=gen, dtype=chol.dtype)
    return torch.nn.functional.normalize(means[cls].to(chol.dtype) + z @ chol.T, dim=-1)

@dataclass
class TaskStats:
    mean: torch.Tensor          # (D,)
    cov: torch.Tensor           # (D, D) shrunk covariance of the task's features
    class_means: torch.Tensor   # (C, D)
    class_counts: torch.Tensor  # (C,)
    class_cov: torch.Tensor     # (D, D) pooled within-class shrunk covariance
    ood_quantiles: torch.Tensor  # (101,) quantiles of held-out in-distribution OOD scores
    # in the random-feature space of clipzoo.router.random_features (None in files of older versions)
    rp_means: torch.Tensor | None = None   # (C, M) class means
    rp_factor: torch.Tensor | None = None  # (M, r) factor of the within-class scatter
    rp_rest: torch.Tensor | None = None    # () its isotropic remainder
    rp_head_w: torch.Tensor | None = None  # (C, M) the task's own class head (class_head), fixed at add
    rp_head_b: torch.Tensor | None = None  # (C,)

    def __post_init__(self) -> None:
        """Means, counts and covariances in float32 (what is stored; files written in float64 by
        older versions load the same way), the OOD quantiles in float64."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                setattr(self, f.name, v.double() if f.name == "ood_quantiles" else v.float())

    def save(self, folder: Path) -> str:
        save_file({k: v.contiguous() for k, v in self.__dict__.items() if v is not None}, str(folder / STATS_FILE))
        return STATS_FILE

    @classmethod
    def load(cls, folder: Path) -> "TaskStats":
        """Read ``stats.safetensors`` (checked as :func:`clipzoo.router.stats_file.read_arrays` says)."""
        return cls.from_arrays(read_arrays(folder))

    @classmethod
    def from_arrays(cls, arrays: dict) -> "TaskStats":
        """From the numpy arrays of a stats file."""
        return cls(**{f.name: torch.from_numpy(arrays[f.name]) if f.name in arrays else None for f in fields(cls)})


def _shrunk_cov(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance (:func:`clipzoo.router.shrinkage.ledoit_wolf`, torch)."""
    return ledoit_wolf(torch.from_numpy(x)).numpy()


def compute_stats(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> TaskStats:
    """Statistics of one task's training features ``(N, D)`` with labels in ``0..C-1``."""
    x = feats.double().numpy()
    y = labels.numpy()
    means, class_cov = class_gaussians(x, y, num_classes)
    rp_means, rp_factor, rp_rest = scatter_factor(random_features(feats, projection(feats.shape[1])), labels, num_classes)
    head_w, head_b = class_head(rp_means, rp_factor, rp_rest, float(len(labels)))
    return TaskStats(
        mean=torch.from_numpy(x.mean(0)),
        cov=torch.from_numpy(_shrunk_cov(x)),
        class_means=torch.from_numpy(means),
        class_counts=torch.from_numpy(np.bincount(y, minlength=num_classes).astype(np.float64)),
        class_cov=torch.from_numpy(class_cov),
        ood_quantiles=heldout_quantiles(feats, labels, num_classes),
        rp_means=rp_means, rp_factor=rp_factor, rp_rest=rp_rest, rp_head_w=head_w, rp_head_b=head_b,
    )
