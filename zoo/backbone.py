"""The frozen CLIP backbone: loading any open_clip model, freezing it, fingerprinting it.

One function, :func:`resolve`, turns a user's backbone spec into what open_clip needs:
- ``clipzoo-tiny`` + ``embedded`` (the default): the project's tiny CLIP, its architecture
  registered as an open_clip model config and its weights read from the packaged safetensors
  file through open_clip's ordinary checkpoint path;
- ``MODEL`` + a pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``) or a local checkpoint file;
- ``hf-hub:org/repo`` (config and weights from the Hub).
A pretrained source that cannot be found or downloaded raises :class:`BackboneError`; nothing
ever falls back to random weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipzoo.errors import BackboneError

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = "clipzoo-tiny"
EMBEDDED = "embedded"
EMBEDDED_WEIGHTS = ASSETS / "clipzoo-tiny.safetensors"

open_clip.add_model_config(ASSETS / f"{TINY_MODEL}.json")


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP to load: an open_clip model name (or ``hf-hub:`` id) and its pretrained source."""

    model: str = TINY_MODEL
    pretrained: str | None = EMBEDDED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        return cls(model=d["model"], pretrained=d.get("pretrained"))

    def __str__(self) -> str:
        return self.model if not self.pretrained else f"{self.model} ({self.pretrained})"


def resolve(spec: BackboneSpec) -> tuple[str, str | None]:
    """Map a spec to open_clip's ``(model_name, pretrained)``; raise on anything ambiguous."""
    if spec.model.startswith("hf-hub:"):
        if spec.pretrained not in (None, ""):
            raise BackboneError(f"{spec.model} carries its own weights: drop --pretrained {spec.pretrained!r}")
        return spec.model, None
    if spec.pretrained == EMBEDDED:
        if spec.model != TINY_MODEL:
            raise BackboneError(f"'embedded' weights exist only for {TINY_MODEL}; give {spec.model} a pretrained tag or file")
        if not EMBEDDED_WEIGHTS.is_file():
            raise BackboneError(f"the embedded weights are missing ({EMBEDDED_WEIGHTS.name}): reinstall clipzoo")
        return spec.model, str(EMBEDDED_WEIGHTS)
    if not spec.pretrained:
        raise BackboneError(
            f"no pretrained weights named for {spec.model}: pass --pretrained TAG_OR_FILE "
            f"(tags: open_clip.list_pretrained_tags_by_model('{spec.model}'))"
        )
    if spec.model.replace("/", "-") not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {spec.model!r}: see open_clip.list_models()")
    return spec.model, spec.pretrained


def fingerprint(model_cfg: dict, model: torch.nn.Module) -> str:
    """sha256 over the architecture config and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Backbone:
    """A frozen open_clip model with its preprocessing, tokenizer and fingerprint."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, model_cfg: dict):
        self.spec = spec
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_cfg = model_cfg
        self.tokenizer = open_clip.get_tokenizer(resolve(spec)[0])
        self.preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
        self.preprocess = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        self.fingerprint = fingerprint(model_cfg, self.model)
        self.embed_dim = int(model_cfg["embed_dim"])
        self.num_params = sum(p.numel() for p in self.model.parameters())

    @property
    def preprocess_id(self) -> str:
        return json.dumps(self.preprocess_cfg, sort_keys=True, default=str)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of preprocessed pixels ``(B, 3, H, W)``."""
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts)), dim=-1)

    @torch.no_grad()
    def class_embeddings(self, classes: list[str], templates: list[str]) -> torch.Tensor:
        """Zero-shot classifier ``(C, D)``: each class's prompts averaged, then unit-normed."""
        emb = self.encode_text(prompt_texts(classes, templates))
        emb = emb.view(len(classes), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)


def class_name_text(name: str) -> str:
    """A class folder name as prompt text: underscores read as spaces."""
    return name.replace("_", " ")


def prompt_texts(classes: list[str], templates: list[str]) -> list[str]:
    """Every template filled with every class name, class-major: ``C * T`` prompts."""
    return [t.format(class_name_text(c)) for c in classes for t in templates]


@functools.lru_cache(maxsize=4)
def load_backbone(spec: BackboneSpec = BackboneSpec()) -> Backbone:
    """Load, freeze and fingerprint a backbone (cached per spec in this process)."""
    name, pretrained = resolve(spec)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, weights_only=True)
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/HTTP errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackboneError(
            f"cannot load pretrained weights for {spec}: {reason}; check the tag, file path or hf-hub id "
            "(no pretrained CLIP can be downloaded without network access)"
        ) from e
    if name.startswith("hf-hub:"):
        cfg = open_clip.factory._get_hf_config(name[len("hf-hub:"):])["model_cfg"]
    else:
        cfg = open_clip.get_model_config(name)
    logging.getLogger(__name__).info("loaded backbone %s", spec)
    return Backbone(spec, model, cfg)
