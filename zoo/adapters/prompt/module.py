"""CoOp soft prompts: ``[SOS] ctx_1 .. ctx_n <class name> . [EOS]`` through the frozen text tower.

The context vectors replace the token embeddings of ``n_ctx`` placeholder words; pooling still
reads the end-of-text position from the token ids. With ``residual`` (the default) the classifier
is ``norm(w_zero_shot + t(ctx) - t(ctx_0))``: the learned prompt moves the zero-shot prompt
ensemble instead of replacing it, and a fresh expert is exactly zero-shot CLIP.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.zoo.adapters.base import ExpertContext
from clipzoo.zoo.adapters.prompt.config import PromptConfig, init_ids
from clipzoo.zoo.backbone import class_name_text
from clipzoo.zoo.encoders import Hooks, encode_text, text_tower
from clipzoo.errors import ConfigError

Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token ids, embeddings) -> unit-norm (N, D)


class PromptLearner(nn.Module):
    def __init__(self, cfg: PromptConfig, ctx: ExpertContext):
        super().__init__()
        self.cfg = cfg
        model, tok = ctx.backbone.model, ctx.backbone.tokenizer
        emb = text_tower(model).token_embedding
        tokens = tok([" ".join(["X"] * cfg.n_ctx) + f" {class_name_text(n)}." for n in ctx.classes])
        x_id = init_ids(tok, "X")
        if len(x_id) != 1 or not bool((tokens[:, 1:1 + cfg.n_ctx] == x_id[0]).all()):
            raise ConfigError("prompt: this tokenizer does not map the placeholder 'X' to one token")
        self.register_buffer("tokens", tokens, persistent=False)
        with torch.no_grad():
            self.register_buffer("base", emb(tokens).float(), persistent=False)
            ctx_vec = torch.randn(cfg.n_ctx, emb.embedding_dim) * 0.02
            ids = init_ids(tok, cfg.init)
            if ids:
                ctx_vec[: len(ids)] = emb(torch.tensor(ids)).float()
        if cfg.class_specific:
            ctx_vec = ctx_vec.unsqueeze(0).repeat(len(ctx.classes), 1, 1)
        self.ctx = nn.Parameter(ctx_vec)
        with torch.no_grad():
            self.register_buffer("initial", self._encode(lambda t, e: encode_text(model, t, Hooks(), e)))

    def _encode(self, encode: Encode) -> torch.Tensor:
        n = self.cfg.n_ctx
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(len(self.tokens), -1, -1)
        embeds = torch.cat([self.base[:, :1], ctx, self.base[:, 1 + n:]], dim=1)
        return encode(self.tokens, embeds)

    def text_classifier(self, encode: Encode, class_emb: torch.Tensor) -> torch.Tensor:
        """The classifier ``(C, D)``; ``encode`` runs the (hooked) frozen text tower."""
        t = self._encode(encode)
        return F.normalize(class_emb + t - self.initial, dim=-1) if self.cfg.residual else t
