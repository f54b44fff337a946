"""CLIP-Adapter settings (Gao et al., 2021)."""

from dataclasses import dataclass, field
from typing import ClassVar

from clipzoo.zoo.adapters.base import AdapterConfig
from clipzoo.errors import ConfigError


@dataclass
class CLIPAdapterConfig(AdapterConfig):
    kind: str = "clip-adapter"
    # chosen on validation splits over 8 real domains and 3 seeds (README, "Expert kinds")
    train_defaults: ClassVar[dict[str, float]] = {"lr": 5e-3}
    reduction: int = field(default=2, metadata={"help": "bottleneck width = embed_dim // reduction"})
    ratio: float = field(default=0.5, metadata={"help": "residual ratio alpha: x = alpha*A(f) + (1-alpha)*f"})
    learn_head: bool = field(default=True, metadata={"help": "train the text-initialised classifier too"})

    def validate(self, ctx) -> None:
        if self.reduction < 1 or self.reduction > ctx.backbone.embed_dim:
            raise ConfigError(f"clip-adapter reduction must be in 1..{ctx.backbone.embed_dim}, got {self.reduction}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"clip-adapter ratio must be in [0, 1], got {self.ratio}")
