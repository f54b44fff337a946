"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on the image embedding."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.clip_adapter.config import CLIPAdapterConfig
from clipzoo.zoo.adapters.clip_adapter.module import CLIPAdapter

register_adapter("clip-adapter", CLIPAdapterConfig, CLIPAdapter)
