"""LoRA (Hu et al., 2022) on the attention (and optionally MLP) of either tower."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.lora.config import LoRAConfig
from clipzoo.zoo.adapters.lora.module import LoRA

register_adapter("lora", LoRAConfig, LoRA)
