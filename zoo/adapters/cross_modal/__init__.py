"""A cross-modal adapter shared by image and text embeddings."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.cross_modal.config import CrossModalConfig
from clipzoo.zoo.adapters.cross_modal.module import CrossModalAdapter

register_adapter("cross-modal", CrossModalConfig, CrossModalAdapter)
