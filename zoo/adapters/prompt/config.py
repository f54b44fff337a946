"""Soft prompt settings (CoOp, Zhou et al., 2022): learnable context tokens on the text tower."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipzoo.zoo.adapters.base import AdapterConfig
from clipzoo.zoo.encoders import text_tower
from clipzoo.errors import ConfigError


@dataclass
class PromptConfig(AdapterConfig):
    kind: str = "prompt"
    n_ctx: int = field(default=4, metadata={"help": "number of learnable context tokens before the class name"})
    init: str = field(default="a photo of a", metadata={"help": "words whose embeddings start the context ('' = random)"})
    class_specific: bool = field(default=False, metadata={"help": "one context per class (CSC) instead of a shared one"})
    residual: bool = field(default=True, metadata={
        "help": "classifier = zero-shot + (prompt's text embedding - its initial value), so a fresh expert is "
                "zero-shot CLIP; false: the prompt's text embeddings are the classifier (plain CoOp)"})

    def validate(self, ctx) -> None:
        tower = text_tower(ctx.backbone.model, str(ctx.backbone.spec))
        room = tower.positional_embedding.shape[0] - 3  # start, end and at least one class-name token
        if not 1 <= self.n_ctx <= room:
            raise ConfigError(f"prompt n_ctx must be in 1..{room} for this text tower, got {self.n_ctx}")
        n_init = len(init_ids(ctx.backbone.tokenizer, self.init))
        if n_init > self.n_ctx:
            raise ConfigError(f"prompt init {self.init!r} is {n_init} tokens, more than n_ctx={self.n_ctx}")


def init_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the start / end / padding tokens."""
    if not text.strip():
        return []
    ids = tokenizer([text])[0].tolist()
    end = ids.index(max(ids))  # the end-of-text token has the highest id
    return ids[1:end]
