"""The adapter-stack expert: one or more adapter kinds (``lora+prompt``) on the frozen backbone.

Its ``config.json`` adds the stack's adapter configs and options to the common fields
(:mod:`clipzoo.zoo.experts.base`).

Forward pass, in stack order: the image tower runs with every module's hooks (only when some
module hooks it; else the cached frozen embedding is used), the classifier comes from a module's
soft prompts or from the prompt templates through the hooked text tower (else the frozen
zero-shot classifier), then the joint-space modules map both. Options: ``ensemble`` mixes in the
zero-shot logits, ``kl_weight`` adds a consistency term during training (see :meth:`Expert.criterion`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.errors import ConfigError
from clipzoo.router.groups import pad_stack
from clipzoo.zoo.adapters import ADAPTERS, AdapterConfig, ExpertContext, parse_kinds
from clipzoo.zoo.backbone import Backbone, prompt_texts
from clipzoo.zoo.encoders import Hooks, encode_image, encode_text
from clipzoo.zoo.experts.base import BuildRequest, Expert, Sources, register_expert

OPTIONS_KEY = "expert"  # settings key for ExpertOptions, beside the kinds' keys (``--set expert.ensemble=0.2``)


@dataclass
class ExpertOptions:
    """Settings of the whole stack (not of one kind)."""

    kl_weight: float = field(default=0.0, metadata={
        "help": "weight of KL(zero-shot || adapted) over the classes while training (CLIP-CITE-style "
                "similarity distillation: keeps the adapted distribution near the frozen model's)"})
    ensemble: float = field(default=0.0, metadata={
        "help": "logits = (1 - ensemble) * adapted + ensemble * zero-shot, at training and inference"})

    def __post_init__(self) -> None:
        vals = asdict(self)
        if not all(type(v) in (int, float) and math.isfinite(v) for v in vals.values()):
            raise ConfigError(f"expert options must be finite numbers, got {vals}")
        if self.kl_weight < 0 or not 0.0 <= self.ensemble <= 1.0:
            raise ConfigError(f"expert options need kl_weight >= 0 and ensemble in [0, 1], got {vals}")

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertOptions":
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ConfigError(f"unknown expert option(s) {', '.join(sorted(set(d) - known))}: choose from {', '.join(sorted(known))}")
        try:
            values = {k: float(v) for k, v in d.items() if not isinstance(v, bool)}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"expert options must be numbers: {e}") from e
        if len(values) != len(d):
            raise ConfigError(f"expert options must be numbers, not true/false: {d}")
        return cls(**values)


class StackExpert(Expert):
    """Adapters applied in stack order; logits = scale * adapted image feature @ adapted classifier."""

    def __init__(self, configs: list[AdapterConfig], classes: list[str], templates: list[str],
                 class_emb: torch.Tensor, logit_scale: float, backbone: Backbone,
                 options: ExpertOptions | None = None):
        super().__init__(classes, templates, class_emb, logit_scale, backbone.fingerprint)
        self.configs = configs
        self.options = options or ExpertOptions()
        self.backbone = backbone  # not an nn.Module: never in state_dict, never switched to train mode
        ctx = ExpertContext(backbone, self.classes, self.templates, self.class_emb)
        for cfg in configs:
            cfg.validate(ctx)
        self.stack = nn.ModuleList(ADAPTERS[c.kind][1](c, ctx) for c in configs)
        self.hooks = Hooks()
        for m in self.stack:
            if hasattr(m, "add_hooks"):
                m.add_hooks(self.hooks)
        self._prompt = next((i for i, m in enumerate(self.stack) if hasattr(m, "text_classifier")), None)
        if "text" in self.hooks.towers() and self._prompt is None:
            toks = backbone.tokenizer(prompt_texts(self.classes, self.templates))
            self.register_buffer("template_tokens", toks, persistent=False)
        self._classifier_cache: torch.Tensor | None = None
        solo = self.needs_pixels or any(hasattr(m, "adapt_image") and not hasattr(m, "adapt_image_grouped")
                                        for m in self.stack)
        self._group_key = None if solo else (type(self), json.dumps(self._config(), sort_keys=True), logit_scale)

    @property
    def kind(self) -> str:
        return "+".join(c.kind for c in self.configs)

    @property
    def needs_pixels(self) -> bool:
        """True when a module works inside the image encoder, so cached features are not enough."""
        return "image" in self.hooks.towers()

    # ----- the forward pass ----------------------------------------------------------------------
    def _encode_text(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        return encode_text(self.backbone.model, tokens, self.hooks, embeds)

    def _text_classifier(self) -> torch.Tensor:
        if self._prompt is not None:
            return self.stack[self._prompt].text_classifier(self._encode_text, self.class_emb)
        if "text" in self.hooks.towers():
            emb = self._encode_text(self.template_tokens).view(len(self.classes), len(self.templates), -1)
            return F.normalize(emb.mean(1), dim=-1)
        return self.class_emb

    def class_weights(self) -> torch.Tensor:
        """The adapted classifier ``(C, D)``; cached in eval mode without autograd."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._classifier_cache is not None:
            return self._classifier_cache
        w = self._text_classifier()
        for m in self.stack:
            w = m.classifier(w) if hasattr(m, "classifier") else w
        if cacheable:
            self._classifier_cache = w
        return w

    def encoder_hooks(self) -> Hooks | None:
        return self.hooks if self.needs_pixels else None

    def adapted_features(self, feats: torch.Tensor, pixels: torch.Tensor | None = None,
                         encoded: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted unit-norm image embedding ``(B, D)`` from frozen embeddings (and pixels, or
        ``encoded``: these rows' output of a tower pass with this expert's hooks, shared with others)."""
        if self.needs_pixels and encoded is not None:
            feats = encoded
        elif self.needs_pixels:
            if pixels is None:
                raise ConfigError(f"a {self.kind} expert works inside the image encoder: it needs pixels, not only features")
            feats = encode_image(self.backbone.model, pixels, self.hooks)
        for m in self.stack:
            feats = m.adapt_image(feats) if hasattr(m, "adapt_image") else feats
        return feats

    def forward(self, feats: torch.Tensor, pixels: torch.Tensor | None = None,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, C)`` from frozen image embeddings ``(B, D)`` (and pixels or ``encoded``, for
        in-encoder kinds)."""
        logits = self.logit_scale * self.adapted_features(feats, pixels, encoded) @ self.class_weights().T
        e = self.options.ensemble
        return (1 - e) * logits + e * self.zero_shot(feats) if e > 0 else logits

    def group_key(self) -> Hashable | None:
        """Stacks of one config (kinds, settings, options) that work on cached features only, each
        image-embedding map able to run grouped (``adapt_image_grouped``), share a key."""
        return self._group_key

    @classmethod
    def grouped_logits(cls, experts: list["StackExpert"], feats: torch.Tensor) -> torch.Tensor:
        x = feats
        for i, m in enumerate(experts[0].stack):
            if hasattr(m, "adapt_image"):
                x = m.adapt_image_grouped([e.stack[i] for e in experts], x)
        first = experts[0]
        logits = first.logit_scale * torch.bmm(x, pad_stack([e.class_weights() for e in experts]).transpose(1, 2))
        mix = first.options.ensemble
        if mix > 0:
            zero = first.logit_scale * torch.bmm(feats, pad_stack([e.class_emb for e in experts]).transpose(1, 2))
            logits = (1 - mix) * logits + mix * zero
        sizes = torch.tensor([len(e.classes) for e in experts])
        return logits.masked_fill(torch.arange(logits.shape[2]) >= sizes[:, None, None], float("-inf"))

    def criterion(self, logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, plus ``kl_weight * KL(p_zero_shot || p_adapted)`` over the classes."""
        loss = F.cross_entropy(logits, labels)
        if self.options.kl_weight > 0:
            ref = F.log_softmax(self.zero_shot(inputs[0]), dim=1)
            kl = F.kl_div(F.log_softmax(logits, dim=1), ref, log_target=True, reduction="batchmean")
            loss = loss + self.options.kl_weight * kl
        return loss

    # ----- bookkeeping -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "StackExpert":
        self._classifier_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._classifier_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----- building and saving (see experts.base) ------------------------------------------------
    @classmethod
    def build(cls, req: BuildRequest) -> "StackExpert":
        """A fresh stack of ``req.kind`` (e.g. ``'lora+prompt'``). ``req.settings`` maps a kind (or
        ``'expert'`` for :class:`ExpertOptions`) to its overrides, each checked against the backbone."""
        if req.sources:
            raise ConfigError(f"--from composes existing experts and needs --kind fusion, not {req.kind!r}")
        kinds = parse_kinds(req.kind)
        unknown = set(req.settings) - set(kinds) - {OPTIONS_KEY}
        if unknown:
            raise ConfigError(f"settings given for kinds not in the stack {req.kind!r}: {', '.join(sorted(unknown))}")
        configs = [ADAPTERS[k][0].from_dict({**req.settings.get(k, {}), "kind": k}, strict=True) for k in kinds]
        options = ExpertOptions.from_dict(req.settings.get(OPTIONS_KEY, {}))
        bb = req.backbone
        return cls(configs, req.classes, req.templates, bb.class_embeddings(req.classes, req.templates),
                   bb.logit_scale, bb, options)

    def _config(self) -> dict:
        return {"stack": [c.to_dict() for c in self.configs], "options": asdict(self.options)}

    @classmethod
    def _from_config(cls, cfg: dict, state: dict[str, torch.Tensor], backbone: Backbone, zoo: Sources) -> "StackExpert":
        configs = [ADAPTERS[c["kind"]][0].from_dict(c) for c in cfg["stack"] if parse_kinds(c["kind"])]
        return cls(configs, cfg["classes"], cfg["templates"], state["class_emb"], cfg["logit_scale"], backbone,
                   ExpertOptions.from_dict(cfg.get("options", {})))


register_expert(StackExpert, default=True)
