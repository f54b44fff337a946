"""Cross-modal adapter (after Jiang et al., 2022): a residual bottleneck on the joint space where
image and text features are compared, applied to the image embedding and to every class embedding.

With ``share`` the same weights map both modalities, so what it learns about one moves the other
too; ``f' = norm(f + up(relu(down(f))))`` with ``up`` zero-initialised (a fresh adapter is the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.zoo.adapters.base import ExpertContext, grouped_linear
from clipzoo.zoo.adapters.cross_modal.config import CrossModalConfig


def _bottleneck(dim: int, hidden: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


class CrossModalAdapter(nn.Module):
    def __init__(self, cfg: CrossModalConfig, ctx: ExpertContext):
        super().__init__()
        self.cfg = cfg
        dim = ctx.class_emb.shape[1]
        hidden = max(1, dim // cfg.reduction)
        self.image = _bottleneck(dim, hidden)
        self.text = None if cfg.share else _bottleneck(dim, hidden)

    def adapt_image(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f + self.image(f), dim=-1)

    @staticmethod
    def adapt_image_grouped(mods: list["CrossModalAdapter"], f: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(grouped_linear([m.image[0] for m in mods], f))
        return F.normalize(f + grouped_linear([m.image[2] for m in mods], hidden), dim=-1)

    def classifier(self, w: torch.Tensor) -> torch.Tensor:
        net = self.image if self.text is None else self.text
        return F.normalize(w + net(w), dim=-1)
