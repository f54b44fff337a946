"""Bottleneck adapters inside the image transformer's blocks."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.vit_adapter.config import ViTAdapterConfig
from clipzoo.zoo.adapters.vit_adapter.module import ViTAdapter

register_adapter("vit-adapter", ViTAdapterConfig, ViTAdapter)
