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
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from clipzoo.errors import BackboneError

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = "clipzoo-tiny"
EMBEDDED = "embedded"
EMBEDDED_WEIGHTS = ASSETS / "clipzoo-tiny.safetensors"
MEMO_VERSION = 1


@functools.lru_cache(maxsize=1)
def _open_clip():
    """open_clip, imported on first use, with the tiny model's config registered."""
    import open_clip

    open_clip.add_model_config(ASSETS / f"{TINY_MODEL}.json")
    return open_clip


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
    if spec.model.replace("/", "-") not in _open_clip().list_models():
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
    """A frozen open_clip model with its preprocessing, tokenizer and fingerprint.

    Built from a loaded ``model``, or lazily: from ``info`` (fingerprint, model and preprocessing
    configs, parameter count, logit scale: see :func:`load_backbone`) and a ``build`` function that
    creates the model the first time :attr:`model` is read, so a zoo whose features are all cached
    answers without ever building it (:attr:`built` says whether it was)."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module | None = None, model_cfg: dict | None = None,
                 *, info: dict | None = None, build: Callable[[], torch.nn.Module] | None = None):
        self.spec = spec
        self._model: torch.nn.Module | None = None
        self._build = build
        self._info = dict(info or {})
        if model is not None:
            self._set_model(model)
        elif info is None or build is None:
            raise ValueError("Backbone needs a model, or info and a build function")
        self.model_cfg = model_cfg if model_cfg is not None else self._info["model_cfg"]
        if info is not None:
            self.preprocess_cfg = dict(info["preprocess_cfg"])
            self.fingerprint = str(info["fingerprint"])
            self.num_params = int(info["num_params"])
        else:
            self.preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
            self.fingerprint = fingerprint(self.model_cfg, model)
            self.num_params = sum(p.numel() for p in model.parameters())
        self.embed_dim = int(self.model_cfg["embed_dim"])

    def _set_model(self, model: torch.nn.Module) -> None:
        self._model = model.eval()
        for p in self._model.parameters():
            p.requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        """The frozen open_clip model (built now if this backbone was opened lazily)."""
        if self._model is None:
            self._set_model(self._build())
            logging.getLogger(__name__).info("built backbone %s on first use", self.spec)
        return self._model

    @property
    def built(self) -> bool:
        return self._model is not None

    @functools.cached_property
    def tokenizer(self):
        return _open_clip().get_tokenizer(resolve(self.spec)[0])

    @functools.cached_property
    def preprocess(self) -> Callable:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    @property
    def preprocess_id(self) -> str:
        return json.dumps(self.preprocess_cfg, sort_keys=True, default=str)

    @property
    def logit_scale(self) -> float:
        if self._model is None and "logit_scale" in self._info:
            return float(self._info["logit_scale"])
        return float(self.model.logit_scale.exp().clamp(max=100))

    def memo_info(self) -> dict:
        """What a lazy copy of this backbone needs (:func:`load_backbone`'s memo)."""
        return {"fingerprint": self.fingerprint, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg,
                "num_params": self.num_params, "logit_scale": self.logit_scale}

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


def _create(spec: BackboneSpec) -> tuple[torch.nn.Module, dict]:
    """open_clip's model for ``spec`` (pretrained weights required) and its architecture config."""
    name, pretrained = resolve(spec)
    open_clip = _open_clip()
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
    return model, cfg


def _config_file(model: str) -> Path | None:
    """The architecture config file open_clip reads for ``model`` (found without importing open_clip)."""
    if model == TINY_MODEL:
        return ASSETS / f"{TINY_MODEL}.json"
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "model_configs" / f"{model.replace('/', '-')}.json"
    return path if path.is_file() else None


def memo_key(spec: BackboneSpec) -> str | None:
    """The key under which a local checkpoint's fingerprint is remembered, or None (a tag or an
    ``hf-hub:`` id: always loaded). It hashes the weights file's absolute path, size, mtime_ns,
    ctime_ns, inode and device, the sha256 of the architecture config file, the model name and the
    installed open_clip and torch versions: any change to the file (even one that keeps its mtime,
    which still moves ctime), a replaced file, another config or another loader gives a new key."""
    if spec.model.startswith("hf-hub:") or not spec.pretrained:
        return None
    weights = EMBEDDED_WEIGHTS if spec.pretrained == EMBEDDED else Path(spec.pretrained)
    cfg = _config_file(spec.model)
    try:
        st = os.stat(weights)
        blob = {"weights": os.path.abspath(weights), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "dev": st.st_dev, "model": spec.model,
                "pretrained": spec.pretrained, "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg
                else None, "open_clip": metadata.version("open_clip_torch"), "torch": metadata.version("torch"),
                "memo": MEMO_VERSION}
    except (OSError, metadata.PackageNotFoundError):
        return None
    if cfg is None or not Path(weights).is_file():
        return None
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _memo_path(key: str) -> Path:
    from clipzoo.runtime import cache_root

    return cache_root() / "backbones" / f"{key}.json"


def _read_memo(key: str) -> dict | None:
    try:
        info = json.loads(_memo_path(key).read_text())
    except (OSError, ValueError):
        return None
    need = {"fingerprint", "model_cfg", "preprocess_cfg", "num_params", "logit_scale"}
    return info if isinstance(info, dict) and need <= set(info) else None


def _write_memo(key: str, bb: Backbone) -> None:
    """Remember ``bb``'s fingerprint and configs (skipped silently when the cache cannot be written)."""
    from clipzoo.zoo.registry import atomic_write_bytes

    path = _memo_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(bb.memo_info(), sort_keys=True, default=str).encode())
    except (OSError, TypeError, ValueError):
        pass


@functools.lru_cache(maxsize=4)
def load_backbone(spec: BackboneSpec = BackboneSpec()) -> Backbone:
    """Load, freeze and fingerprint a backbone (cached per spec in this process).

    For a local checkpoint file (and the embedded weights) the fingerprint, configs and parameter
    count are remembered under the cache root, keyed by :func:`memo_key`; when the memo holds them
    the backbone is returned lazily: the weights are neither hashed again nor loaded until the
    model is first needed."""
    key = memo_key(spec)
    info = _read_memo(key) if key else None
    if info is not None:  # written only after a full load of this very file succeeded
        return Backbone(spec, info=info, build=lambda: _create(spec)[0])
    model, cfg = _create(spec)
    bb = Backbone(spec, model, cfg)
    if key:
        _write_memo(key, bb)
    return bb
