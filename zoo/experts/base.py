"""What every expert is, and its one save/load (``save_pretrained`` / ``from_pretrained``).

An expert answers one task's classes on the frozen backbone. On disk it is a folder with two
fixed files: ``config.json`` (the fields every expert has, plus its kind's own, through
:meth:`Expert._config`) and ``weights.safetensors`` (its own tensors only, never the
backbone's). Loading reads the config, refuses another backbone, builds the kind's module
(:meth:`Expert._from_config`) and loads the weights with ``strict=True``. Kinds register
themselves (:func:`register_expert`) at the end of their module, and :func:`expert_type` finds
the class for a kind string, so no caller branches on kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from clipzoo import __version__
from clipzoo.errors import BackboneError, ClipzooError, ConfigError, IntegrityError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_KEYS = ("kind", "classes", "templates", "logit_scale", "backbone_fingerprint")  # every config has these


def _damaged(folder: Path, fname: str, problem: str) -> IntegrityError:
    """One line naming the expert, its file, what is wrong and the fix."""
    where = f" --zoo {folder.parent.parent} --name {folder.name}" if folder.parent.name == "experts" else ""
    return IntegrityError(f"expert {folder.name!r}: {fname} {problem}; restore it (clipzoo pull) "
                          f"or remove the expert (clipzoo remove{where})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def read_config(folder: Path) -> dict:
    """An expert's ``config.json``, refused (IntegrityError) when the folder or file is missing,
    unreadable, not a JSON object, or lacks a field every expert's config has."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise _damaged(folder, "folder", f"{folder} is missing")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _damaged(folder, CONFIG_FILE, "is missing") from None
    except OSError as e:
        raise _damaged(folder, CONFIG_FILE, f"cannot be read ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(folder, CONFIG_FILE, f"is not valid JSON ({_one_line(e)})") from e
    if not isinstance(cfg, dict):
        raise _damaged(folder, CONFIG_FILE, "is not a JSON object")
    lack = [k for k in CONFIG_KEYS if k not in cfg]
    if lack:
        raise _damaged(folder, CONFIG_FILE, f"lacks {', '.join(lack)}")
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An expert's tensors from ``weights.safetensors`` (safetensors never unpickles); a missing,
    truncated or foreign file (a pickle, say) is one IntegrityError."""
    try:
        return load_file(str(folder / WEIGHTS_FILE))
    except FileNotFoundError:
        raise _damaged(folder, WEIGHTS_FILE, "is missing") from None
    except OSError as e:
        raise _damaged(folder, WEIGHTS_FILE, f"cannot be read ({e.strerror or e})") from e
    except (SafetensorError, ValueError) as e:
        raise _damaged(folder, WEIGHTS_FILE, f"is not a valid safetensors file ({_one_line(e)})") from e


def _no_source(name: str):
    raise ConfigError(f"expert {name!r} is not available here: composed experts are built and loaded inside a zoo")


@dataclass
class Sources:
    """The zoo's other experts, as a composed expert may read them while it is built or loaded."""

    names: Sequence[str] = ()
    get: Callable[[str], "Expert"] = _no_source  # a loaded expert by name
    sha256: Callable[[str], str] = _no_source  # an expert's weights hash by name


@dataclass
class BuildRequest:
    """Everything a kind needs to build a fresh expert for a task."""

    kind: str
    backbone: Any  # clipzoo.zoo.backbone.Backbone
    classes: list[str]
    templates: list[str]
    settings: dict = field(default_factory=dict)  # kind -> {key: value}, as parse_settings gives
    sources: list[str] | None = None  # experts to compose (composed kinds only)
    zoo: Sources = field(default_factory=Sources)
    seed: int = 0


class Expert(nn.Module):
    """Base of every expert kind: logits ``(B, C)`` from frozen image embeddings ``(B, D)``."""

    composed: ClassVar[bool] = False  # True for kinds built over other experts (see source_weights)

    def __init__(self, classes: list[str], templates: list[str], class_emb: torch.Tensor, logit_scale: float,
                 fingerprint: str):
        super().__init__()
        self.classes = list(classes)
        self.templates = list(templates)
        self.logit_scale = logit_scale
        self.fingerprint = fingerprint
        self.register_buffer("class_emb", class_emb.detach().clone().float())  # frozen zero-shot classifier

    # ----- what a kind defines --------------------------------------------------------------------
    @classmethod
    def accepts(cls, kind: str) -> bool:
        """True when this class builds experts of ``kind`` (a kind string as the user gives it)."""
        return False

    @classmethod
    def build(cls, req: BuildRequest) -> "Expert":
        """A fresh expert (the identity on the frozen backbone) for ``req``; settings checked here."""
        raise NotImplementedError

    def _config(self) -> dict:
        """The kind's own fields of ``config.json``."""
        raise NotImplementedError

    @classmethod
    def _from_config(cls, cfg: dict, state: dict[str, torch.Tensor], backbone, zoo: Sources) -> "Expert":
        """An expert of this kind with the saved config (weights are loaded after)."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        raise NotImplementedError

    # ----- shared behaviour -------------------------------------------------------------------------
    @property
    def needs_pixels(self) -> bool:
        """True when the expert works inside the image encoder, so cached features are not enough."""
        return False

    def encoder_hooks(self):
        """The expert's image-tower hooks (:class:`clipzoo.zoo.encoders.Hooks`) when its in-encoder
        part can share one tower pass with other experts' rows, and :meth:`forward` then takes the
        pass's output as ``encoded``; None otherwise."""
        return None

    def adapted_features(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted unit-norm image embedding ``(B, D)``."""
        raise NotImplementedError

    def class_weights(self) -> torch.Tensor:
        """The adapted classifier ``(C, D)``."""
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.adapted_features(feats, pixels) @ self.class_weights().T

    def group_key(self) -> Hashable | None:
        """Experts with the same key (not None) compute their logits together, as one
        :meth:`grouped_logits` call of their class, when a batch is routed to several of them."""
        return None

    @classmethod
    def grouped_logits(cls, experts: list["Expert"], feats: torch.Tensor) -> torch.Tensor:
        """``experts[g]``'s logits on ``feats[g]``: ``(G, R, D)`` -> ``(G, R, C_max)``, ``-inf`` past
        an expert's own classes (only for experts of one :meth:`group_key`)."""
        raise NotImplementedError

    def zero_shot(self, feats: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's logits for frozen image embeddings ``(B, D)``."""
        return self.logit_scale * feats @ self.class_emb.T

    def criterion(self, logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The training loss (cross-entropy unless a kind adds to it)."""
        return F.cross_entropy(logits, labels)

    def record_fields(self) -> dict:
        """Extra fields of this expert's registry record (a composed expert lists its sources)."""
        return {}

    def source_weights(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> list[dict]:
        """Per input, the weight given to each source expert (composed kinds only)."""
        raise NotImplementedError

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----- the one save / load ----------------------------------------------------------------------
    def save_pretrained(self, folder: Path) -> list[str]:
        """Write ``config.json`` and ``weights.safetensors`` into ``folder``; return their names."""
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"clipzoo_version": __version__, "kind": self.kind, **self._config(), "classes": self.classes,
               "templates": self.templates, "logit_scale": self.logit_scale, "backbone_fingerprint": self.fingerprint}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "kind": self.kind})
        return [CONFIG_FILE, WEIGHTS_FILE]

    @classmethod
    def from_pretrained(cls, folder: Path, backbone, zoo: Sources | None = None) -> "Expert":
        """Load an expert saved by :meth:`save_pretrained`; refuses one trained on another backbone.
        A damaged folder (bad JSON, a missing field, foreign or mismatched weights) is one
        IntegrityError naming the expert, never a traceback."""
        cfg = read_config(folder)
        if cfg["backbone_fingerprint"] != backbone.fingerprint:
            raise BackboneError(
                f"expert in {folder.name} was trained on backbone {str(cfg['backbone_fingerprint'])[:12]}, "
                f"not on the loaded {backbone.fingerprint[:12]} ({backbone.spec}): open it with its own backbone")
        state = read_weights(folder)
        try:
            expert = expert_type(str(cfg["kind"]))._from_config(cfg, state, backbone, zoo or Sources())
        except ClipzooError:
            raise
        except KeyError as e:
            raise _damaged(folder, f"{CONFIG_FILE} or {WEIGHTS_FILE}", f"lacks {e}") from e
        except (TypeError, ValueError, RuntimeError) as e:
            raise _damaged(folder, CONFIG_FILE, f"has a bad value ({_one_line(e)})") from e
        try:
            expert.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise _damaged(folder, WEIGHTS_FILE, f"does not fit its config ({_one_line(e)})") from e
        return expert.eval()


EXPERT_TYPES: list[type[Expert]] = []
_DEFAULT: list[type[Expert]] = []


def register_expert(cls: type[Expert], default: bool = False) -> None:
    """Make ``cls`` buildable and loadable by kind; each kind module calls this once. The
    ``default`` class (the adapter stack) takes every kind no other class accepts, so its own
    parser names an unknown kind and the choices."""
    if cls in EXPERT_TYPES:
        raise ConfigError(f"expert type {cls.__name__} is already registered")
    EXPERT_TYPES.append(cls)
    if default:
        _DEFAULT[:] = [cls]


def expert_type(kind: str) -> type[Expert]:
    """The registered class that builds and loads experts of ``kind``."""
    return next((cls for cls in EXPERT_TYPES if cls.accepts(kind)), _DEFAULT[0])


def build_expert(kind: str, backbone, classes: list[str], templates: list[str], settings: dict | None = None, *,
                 sources: list[str] | None = None, zoo: Sources | None = None, seed: int = 0) -> Expert:
    """A fresh expert of ``kind`` (an adapter stack such as ``'lora+prompt'``, or ``'fusion'``)."""
    req = BuildRequest(kind, backbone, list(classes), list(templates), dict(settings or {}), sources,
                       zoo or Sources(), seed)
    return expert_type(kind).build(req)


def load_expert(folder: Path, backbone, zoo: Sources | None = None) -> Expert:
    """Load any expert kind from its folder (see :meth:`Expert.from_pretrained`)."""
    return Expert.from_pretrained(folder, backbone, zoo)


def parse_settings(pairs: list[str] | tuple[str, ...]) -> dict:
    """``['lora.rank=4', 'lora.targets=["q","v"]']`` -> ``{'lora': {'rank': 4, 'targets': ['q', 'v']}}``.

    VALUE is read as JSON when it parses (numbers, true/false, lists), else kept as a string.
    """
    out: dict[str, dict] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        kind, dot, field_name = key.strip().partition(".")
        if not eq or not dot or not kind or not field_name:
            raise ConfigError(f"bad setting {pair!r}: use KIND.KEY=VALUE, e.g. lora.rank=8")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(kind, {})[field_name.strip()] = value
    return out
