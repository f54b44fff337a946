"""Adapter kinds: one folder per kind (``config.py`` + ``module.py``), registered here.

Adding a kind = a folder, one :func:`register_adapter` line below, one row in the tests' table.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from zoo.errors import ConfigError


@dataclass
class AdapterConfig:
    """Base of every kind's config; subclasses set ``kind`` and add fields with help text."""

    kind: str = ""

    def validate(self, ctx: "ExpertContext") -> None:
        """Raise ConfigError for settings this backbone cannot host (checked before training)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        """Build from saved JSON: unknown keys warn, wrong types fail."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
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
    if base is typing.Union:
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
    if base in (int, float, str, bool) and not (isinstance(value, base) and not (base is int and isinstance(value, bool))):
        raise ConfigError(f"{owner}.{key} must be {base.__name__}, got {value!r}")
    return value


@dataclass
class ExpertContext:
    """What a kind's module may read while it is built: the frozen backbone and the task."""

    backbone: Any
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


def _register_builtins() -> None:
    from zoo.adapters.clip_adapter.config import CLIPAdapterConfig
    from zoo.adapters.clip_adapter.module import CLIPAdapter

    register_adapter("clip-adapter", CLIPAdapterConfig, CLIPAdapter)


_register_builtins()
