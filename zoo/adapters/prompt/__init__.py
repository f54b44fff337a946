"""Soft prompts for the text tower (CoOp, Zhou et al., 2022)."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.prompt.config import PromptConfig
from clipzoo.zoo.adapters.prompt.module import PromptLearner

register_adapter("prompt", PromptConfig, PromptLearner)
