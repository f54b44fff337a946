"""Bottleneck adapters inside the ViT's blocks (Houlsby et al., 2019; AdaptFormer-style placement)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from clipzoo.zoo.adapters.base import AdapterConfig, check_blocks
from clipzoo.zoo.encoders import tower_blocks
from clipzoo.errors import ConfigError

PLACEMENTS = ("attn", "mlp", "both")


@dataclass
class ViTAdapterConfig(AdapterConfig):
    kind: str = "vit-adapter"
    blocks: Optional[list[int]] = field(default=None, metadata={"help": "block indices to adapt (default: every block)"})
    bottleneck: Optional[int] = field(default=None, metadata={"help": "bottleneck width (default: tower width // 8)"})
    placement: str = field(default="both", metadata={"help": "after the 'attn' block, the 'mlp' block, or 'both'"})

    towers: ClassVar[tuple[str, ...]] = ("image",)
    train_defaults: ClassVar[dict[str, float]] = {"epochs": 10, "lr": 5e-3}

    def validate(self, ctx) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"{self.kind} placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"{self.kind} bottleneck must be >= 1, got {self.bottleneck}")
        for tower in self.towers:
            n = len(tower_blocks(ctx.backbone.model, tower, str(ctx.backbone.spec)))
            check_blocks(self.kind, self.blocks, n, tower)
