"""LoRA settings (Hu et al., 2021) for the attention projections of both CLIP towers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from clipzoo.zoo.adapters.base import AdapterConfig, check_blocks
from clipzoo.zoo.encoders import tower_blocks
from clipzoo.errors import ConfigError

TARGETS = ("q", "k", "v", "out")
TOWER_CHOICES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


@dataclass
class LoRAConfig(AdapterConfig):
    kind: str = "lora"
    rank: int = field(default=8, metadata={"help": "rank r of the update B A (4 to 16 is typical)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling: h = W x + (alpha / r) B A x"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input while training"})
    targets: list[str] = field(default_factory=lambda: ["q", "v"],
                               metadata={"help": "attention projections to adapt: q, k, v (fused in_proj), out"})
    mlp: bool = field(default=False, metadata={"help": "also adapt the MLP's c_fc and c_proj"})
    towers: str = field(default="both", metadata={"help": "'image', 'text' or 'both'"})
    blocks: Optional[list[int]] = field(default=None, metadata={"help": "block indices to adapt (default: every block)"})

    train_defaults: ClassVar[dict[str, float]] = {"epochs": 10, "lr": 5e-3}

    def validate(self, ctx) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets must be distinct names from {', '.join(TARGETS)}, got {self.targets}")
        if self.towers not in TOWER_CHOICES:
            raise ConfigError(f"lora towers must be one of {', '.join(TOWER_CHOICES)}, got {self.towers!r}")
        for tower in TOWER_CHOICES[self.towers]:
            blocks = tower_blocks(ctx.backbone.model, tower, str(ctx.backbone.spec))
            check_blocks(self.kind, self.blocks, len(blocks), tower)
            width = blocks[0].ln_1.normalized_shape[0]
            if self.rank > width:
                raise ConfigError(f"lora rank {self.rank} exceeds the {tower} tower's width {width}")
