"""Bottleneck adapters in both the image and the text transformer (VL-Adapter, Sung et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipzoo.zoo.adapters.vit_adapter.config import ViTAdapterConfig


@dataclass
class VLAdapterConfig(ViTAdapterConfig):
    """The vit-adapter settings, applied to the same block indices of both towers."""

    kind: str = "vl-adapter"

    towers: ClassVar[tuple[str, ...]] = ("image", "text")
