"""CLIP-Adapter: a residual bottleneck MLP on the frozen image embedding, and a classifier
initialised from the class-name text embeddings.

``x = ratio * up(relu(down(f))) + (1 - ratio) * f``; logits = ``scale * norm(x) @ norm(W)^T``.
Unlike the paper, ``up`` has no trailing ReLU and starts at zero, so a fresh adapter returns
exactly the zero-shot logits (a ReLU after a zero-initialised layer would never get a gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.zoo.adapters.base import ExpertContext, grouped_linear
from clipzoo.zoo.adapters.clip_adapter.config import CLIPAdapterConfig


class CLIPAdapter(nn.Module):
    """Works on the frozen image embedding only, so it trains from the feature cache."""

    def __init__(self, cfg: CLIPAdapterConfig, ctx: ExpertContext):
        super().__init__()
        self.cfg = cfg
        dim = ctx.class_emb.shape[1]
        self.down = nn.Linear(dim, max(1, dim // cfg.reduction), bias=False)
        self.up = nn.Linear(max(1, dim // cfg.reduction), dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.head = nn.Parameter(ctx.class_emb.clone().float(), requires_grad=cfg.learn_head)

    def adapt_image(self, f: torch.Tensor) -> torch.Tensor:
        r = self.cfg.ratio
        return F.normalize(r * self.up(F.relu(self.down(f))) + (1 - r) * f, dim=-1)

    @staticmethod
    def adapt_image_grouped(mods: list["CLIPAdapter"], f: torch.Tensor) -> torch.Tensor:
        r = mods[0].cfg.ratio  # one config for the group
        up = grouped_linear([m.up for m in mods], F.relu(grouped_linear([m.down for m in mods], f)))
        return F.normalize(r * up + (1 - r) * f, dim=-1)

    def classifier(self, class_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head, dim=-1)
