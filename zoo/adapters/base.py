"""The adapter kinds' shared parts: the config base class, the build context, and the registry.

A kind's module may implement any of (:class:`clipzoo.zoo.experts.stack.StackExpert` calls what is there):

- ``add_hooks(hooks)``: put callables inside the frozen towers' blocks (:mod:`clipzoo.zoo.encoders`);
  a module hooking the image tower makes its expert need pixels, not only cached features;
- ``text_classifier(encode, class_emb)``: the classifier from its own text input (soft prompts);
- ``adapt_image(f)`` / ``classifier(w)``: maps of the image embedding / classifier in the joint space;
- ``adapt_image_grouped(modules, f)`` (static): ``adapt_image`` of many same-config modules at once,
  ``f`` ``(G, R, D)`` holding group ``g``'s rows for ``modules[g]``: experts routed in one batch
  then run as a few batched products (:meth:`clipzoo.zoo.experts.stack.StackExpert.grouped_logits`).

Every module starts as the identity (zero-initialised outputs): a fresh expert gives the zero-shot logits.
"""

from __future__ import annotations

import dataclasses
import types
import math
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from clipzoo.errors import ConfigError


@dataclass
class AdapterConfig:
    """Base of every kind's config; subclasses set ``kind`` and add fields with help text."""

    kind: str = ""
    # training defaults of the kind where the user gives none ({'epochs': .., 'lr': ..}; see zoo.train.train_defaults)
    train_defaults: ClassVar[dict[str, float]] = {}

    def validate(self, ctx: "ExpertContext") -> None:
        """Raise ConfigError for settings this backbone cannot host (checked before training)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> "AdapterConfig":
        """Build from JSON: wrong types fail; unknown keys warn (saved configs) or fail (``strict``,
        a user's fresh settings, where an unknown key is a typo)."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown and strict:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for {d.get('kind') or cls.__name__}: "
                              f"choose from {', '.join(sorted(fields - {'kind'}))}")
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown settings {unknown}", stacklevel=2)
        kwargs = {}
        for k, v in d.items():
            if k not in fields:
                continue
            kwargs[k] = _coerce(cls.__name__, k, v, hints[k])
        return cls(**kwargs)


def _coerce(owner: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    base = origin or hint
    if base is typing.Union or base is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(owner, key, value, args[0])
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{owner}.{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(owner, key, v, item) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{owner}.{key} must be a finite number, got {value!r}")
    if base in (int, float, str, bool) and not (isinstance(value, base) and not (base is int and isinstance(value, bool))):
        raise ConfigError(f"{owner}.{key} must be {base.__name__}, got {value!r}")
    return value


@dataclass
class ExpertContext:
    """What a kind's module may read while it is built: the frozen backbone and the task."""

    backbone: Any  # zoo.backbone.Backbone
    classes: list[str]
    templates: list[str]
    class_emb: torch.Tensor  # (C, D) zero-shot classifier of the frozen backbone


ADAPTERS: dict[str, tuple[type[AdapterConfig], type[torch.nn.Module]]] = {}


def register_adapter(kind: str, config_cls: type[AdapterConfig], module_cls: type[torch.nn.Module]) -> None:
    if kind in ADAPTERS:
        raise ConfigError(f"adapter kind {kind!r} is already registered")
    ADAPTERS[kind] = (config_cls, module_cls)


def parse_kinds(spec: str) -> list[str]:
    """``'lora+prompt'`` -> ``['lora', 'prompt']``, each a registered kind."""
    kinds = [k.strip() for k in spec.split("+") if k.strip()]
    if not kinds:
        raise ConfigError("empty --kind: choose from " + ", ".join(sorted(ADAPTERS)))
    for k in kinds:
        if k not in ADAPTERS:
            raise ConfigError(f"unknown expert kind {k!r}: choose from {', '.join(sorted(ADAPTERS))} (stack with '+')")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"kind stack {spec!r} repeats a kind")
    return kinds


def check_blocks(kind: str, blocks: list[int] | None, n: int, tower: str) -> list[int]:
    """The block indices to adapt (``None``: all ``n``); ConfigError for one out of range."""
    if blocks is None:
        return list(range(n))
    if not blocks:
        raise ConfigError(f"{kind}: empty list of {tower} blocks (omit it to adapt every block)")
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise ConfigError(f"{kind}: {tower} block index {bad[0]} out of range: the {tower} tower has {n} blocks (0..{n - 1})")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{kind}: {tower} block indices repeat: {blocks}")
    return sorted(blocks)


def grouped_linear(layers: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """``layers[g](x[g])`` for every ``g`` as one batched product: ``x`` ``(G, R, in)`` -> ``(G, R, out)``."""
    y = torch.bmm(x, torch.stack([m.weight for m in layers]).transpose(1, 2))
    return y if layers[0].bias is None else y + torch.stack([m.bias for m in layers])[:, None, :]
