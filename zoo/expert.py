"""An expert: a stack of adapter modules on the frozen backbone, for one task's classes.

Saved as ``config.json`` (the stack's configs, classes, prompts, backbone fingerprint) and
``weights.safetensors`` (the expert's own tensors only; never the backbone's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zoo import __version__
from zoo.adapters import ADAPTERS, AdapterConfig, ExpertContext, parse_kinds
from zoo.backbone import Backbone
from zoo.errors import BackboneError, ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class Expert(nn.Module):
    """Adapters applied in stack order; logits = scale * adapted image feature @ adapted classifier."""

    def __init__(self, configs: list[AdapterConfig], classes: list[str], templates: list[str],
                 class_emb: torch.Tensor, logit_scale: float, backbone: Backbone):
        super().__init__()
        self.configs = configs
        self.classes = list(classes)
        self.templates = list(templates)
        self.logit_scale = logit_scale
        self.fingerprint = backbone.fingerprint
        self.register_buffer("class_emb", class_emb.detach().clone().float())
        ctx = ExpertContext(backbone, self.classes, self.templates, self.class_emb)
        for cfg in configs:
            cfg.validate(ctx)
        self.stack = nn.ModuleList(ADAPTERS[c.kind][1](c, ctx) for c in configs)

    @property
    def kind(self) -> str:
        return "+".join(c.kind for c in self.configs)

    @property
    def needs_pixels(self) -> bool:
        """True when a module works inside the image encoder, so cached features are not enough."""
        return any(getattr(m, "stage", "feature") != "feature" for m in self.stack)

    def forward(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, C)`` from frozen image embeddings ``(B, D)`` (and pixels, for in-encoder kinds)."""
        w = self.class_emb
        for m in self.stack:
            feats = m.adapt_image(feats) if hasattr(m, "adapt_image") else feats
            w = m.classifier(w) if hasattr(m, "classifier") else w
        return self.logit_scale * feats @ w.T

    def adapted_features(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted image features ``(B, D)`` that :meth:`forward` scores (used by fusion);
        ``forward(f, p) == logit_scale * adapted_features(f, p) @ class_weights().T``."""
        for m in self.stack:
            feats = m.adapt_image(feats) if hasattr(m, "adapt_image") else feats
        return feats

    def class_weights(self) -> torch.Tensor:
        """The adapted classifier ``(C, D)`` that :meth:`forward` scores against."""
        w = self.class_emb
        for m in self.stack:
            w = m.classifier(w) if hasattr(m, "classifier") else w
        return w

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save(self, folder: Path) -> list[str]:
        """Write config and weights into ``folder``; return the file names written."""
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "clipzoo_version": __version__,
            "kind": self.kind,
            "stack": [c.to_dict() for c in self.configs],
            "classes": self.classes,
            "templates": self.templates,
            "logit_scale": self.logit_scale,
            "backbone_fingerprint": self.fingerprint,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "kind": self.kind})
        return [CONFIG_FILE, WEIGHTS_FILE]


def build_expert(kind: str, backbone: Backbone, classes: list[str], templates: list[str],
                 settings: dict | None = None) -> Expert:
    """A fresh expert of stack ``kind`` (e.g. ``'clip-adapter'``); ``settings`` maps kind -> overrides."""
    settings = settings or {}
    unknown = set(settings) - set(parse_kinds(kind))
    if unknown:
        raise ConfigError(f"settings given for kinds not in the stack {kind!r}: {', '.join(sorted(unknown))}")
    configs = [ADAPTERS[k][0].from_dict({**settings.get(k, {}), "kind": k}) for k in parse_kinds(kind)]
    class_emb = backbone.class_embeddings(classes, templates)
    return Expert(configs, classes, templates, class_emb, backbone.logit_scale, backbone)


def load_expert(folder: Path, backbone: Backbone) -> Expert:
    """Load an expert saved by :meth:`Expert.save`; refuses one trained on another backbone."""
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg["backbone_fingerprint"] != backbone.fingerprint:
        raise BackboneError(
            f"expert in {folder.name} was trained on backbone {cfg['backbone_fingerprint'][:12]}, "
            f"not on the loaded {backbone.fingerprint[:12]} ({backbone.spec}): open it with its own backbone"
        )
    configs = [ADAPTERS[c["kind"]][0].from_dict(c) for c in cfg["stack"] if parse_kinds(c["kind"])]
    state = load_file(str(folder / WEIGHTS_FILE))
    expert = Expert(configs, cfg["classes"], cfg["templates"], state["class_emb"], cfg["logit_scale"], backbone)
    expert.load_state_dict(state, strict=True)
    return expert.eval()
