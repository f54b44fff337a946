"""Per-task statistics of frozen image features, kept in the zoo instead of old raw images.

For each task: the task mean and a Ledoit-Wolf shrunk covariance of its training features,
plus per-class means and counts and the pooled within-class shrunk covariance (what a router
needs to sample pseudo-features of old tasks later). Stored as ``stats.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.covariance import LedoitWolf

STATS_FILE = "stats.safetensors"


@dataclass
class TaskStats:
    mean: torch.Tensor          # (D,)
    cov: torch.Tensor           # (D, D) shrunk covariance of the task's features
    class_means: torch.Tensor   # (C, D)
    class_counts: torch.Tensor  # (C,)
    class_cov: torch.Tensor     # (D, D) pooled within-class shrunk covariance

    def save(self, folder: Path) -> str:
        save_file({k: v.contiguous().double() for k, v in self.__dict__.items()}, str(folder / STATS_FILE))
        return STATS_FILE

    @classmethod
    def load(cls, folder: Path) -> "TaskStats":
        return cls(**load_file(str(folder / STATS_FILE)))


def _shrunk_cov(x: np.ndarray) -> np.ndarray:
    return LedoitWolf(assume_centered=False).fit(x).covariance_


def compute_stats(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> TaskStats:
    """Statistics of one task's training features ``(N, D)`` with labels in ``0..C-1``."""
    x = feats.double().numpy()
    y = labels.numpy()
    means = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(num_classes)])
    centred = x - means[y]
    return TaskStats(
        mean=torch.from_numpy(x.mean(0)),
        cov=torch.from_numpy(_shrunk_cov(x)),
        class_means=torch.from_numpy(means),
        class_counts=torch.from_numpy(np.bincount(y, minlength=num_classes).astype(np.float64)),
        class_cov=torch.from_numpy(_shrunk_cov(centred)),
    )
