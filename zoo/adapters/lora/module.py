"""LoRA on the frozen towers: ``h = W x + (alpha / r) B A x`` beside each adapted projection.

open_clip 3.x keeps q, k and v in ``nn.MultiheadAttention``'s fused ``in_proj_weight`` (3W x W);
the q / k / v deltas are computed separately and placed in their slices of the fused output
(zeros elsewhere), never merged into the shared weights, so experts can run side by side.
``B`` starts at zero: a fresh LoRA expert gives exactly the zero-shot logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipzoo.zoo.adapters.base import ExpertContext, check_blocks
from clipzoo.zoo.adapters.lora.config import TOWER_CHOICES, LoRAConfig
from clipzoo.zoo.encoders import Hooks, tower_blocks


class LowRank(nn.Module):
    """``(alpha / r) B A dropout(x)``, ``A`` Kaiming-uniform, ``B`` zero."""

    def __init__(self, d_in: int, d_out: int, cfg: LoRAConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(cfg.rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = cfg.alpha / cfg.rank
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.drop(x) @ self.A.T) @ self.B.T


class FusedQKV(nn.Module):
    """LoRA deltas for some of q, k, v, laid out as the fused ``in_proj`` output ``(..., 3W)``."""

    def __init__(self, width: int, targets: list[str], cfg: LoRAConfig):
        super().__init__()
        self.parts = nn.ModuleDict({t: LowRank(width, width, cfg) for t in ("q", "k", "v") if t in targets})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = None
        out = []
        for t in ("q", "k", "v"):
            if t in self.parts:
                out.append(self.parts[t](x))
            else:
                zeros = zeros if zeros is not None else x.new_zeros(*x.shape[:-1], x.shape[-1])
                out.append(zeros)
        return torch.cat(out, dim=-1)


class LoRA(nn.Module):
    def __init__(self, cfg: LoRAConfig, ctx: ExpertContext):
        super().__init__()
        self.cfg = cfg
        self.sites = nn.ModuleDict()
        for tower in TOWER_CHOICES[cfg.towers]:
            blocks = tower_blocks(ctx.backbone.model, tower)
            for i in check_blocks(cfg.kind, cfg.blocks, len(blocks), tower):
                blk = blocks[i]
                width = blk.ln_1.normalized_shape[0]
                if set(cfg.targets) & {"q", "k", "v"}:
                    self.sites[f"{tower}_{i}_qkv"] = FusedQKV(width, cfg.targets, cfg)
                if "out" in cfg.targets:
                    self.sites[f"{tower}_{i}_out"] = LowRank(width, width, cfg)
                if cfg.mlp:
                    hidden = blk.mlp.c_fc.out_features
                    self.sites[f"{tower}_{i}_fc"] = LowRank(width, hidden, cfg)
                    self.sites[f"{tower}_{i}_proj"] = LowRank(hidden, width, cfg)

    def add_hooks(self, hooks: Hooks) -> None:
        hooks.add_keyed(self.sites)
