"""Bottleneck adapters after the attention and/or MLP sub-layer of chosen transformer blocks.

Each adapter maps the sub-layer output ``a`` (before the block's residual add) to
``a + up(gelu(down(LayerNorm(a))))``; ``up`` starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.zoo.adapters.base import ExpertContext, check_blocks
from clipzoo.zoo.adapters.vit_adapter.config import ViTAdapterConfig
from clipzoo.zoo.encoders import Hooks, tower_blocks


class Bottleneck(nn.Module):
    """``x + up(gelu(down(LayerNorm(x))))`` with ``up`` zero-initialised."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class ViTAdapter(nn.Module):
    """Adapters in the image tower's blocks (``VLAdapter`` adds the text tower's)."""

    def __init__(self, cfg: ViTAdapterConfig, ctx: ExpertContext):
        super().__init__()
        self.cfg = cfg
        sites = {"attn": ["post_attn"], "mlp": ["post_mlp"], "both": ["post_attn", "post_mlp"]}[cfg.placement]
        self.adapters = nn.ModuleDict()
        for tower in cfg.towers:
            blocks = tower_blocks(ctx.backbone.model, tower)
            width = blocks[0].ln_1.normalized_shape[0]
            for i in check_blocks(cfg.kind, cfg.blocks, len(blocks), tower):
                for site in sites:
                    self.adapters[f"{tower}_{i}_{site}"] = Bottleneck(width, cfg.bottleneck or max(1, width // 8))

    def add_hooks(self, hooks: Hooks) -> None:
        hooks.add_keyed(self.adapters)
