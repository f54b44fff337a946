"""Cross-modal adapter settings: one adapter shared by both modalities in the joint embedding space."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipzoo.zoo.adapters.base import AdapterConfig
from clipzoo.errors import ConfigError


@dataclass
class CrossModalConfig(AdapterConfig):
    kind: str = "cross-modal"
    reduction: int = field(default=4, metadata={"help": "bottleneck width = embed_dim // reduction"})
    share: bool = field(default=True, metadata={"help": "one adapter for image and text features (else one each)"})

    def validate(self, ctx) -> None:
        if not 1 <= self.reduction <= ctx.backbone.embed_dim:
            raise ConfigError(f"cross-modal reduction must be in 1..{ctx.backbone.embed_dim}, got {self.reduction}")
