"""Adapter kinds: one folder per kind (``config.py`` + ``module.py``), each registering itself.

Adding a kind = a folder whose ``__init__.py`` ends with :func:`register_adapter`, one import
below, one row in the tests' table. What a kind's module may implement: :mod:`.base`.
"""

from clipzoo.zoo.adapters import clip_adapter, cross_modal, lora, prompt, vit_adapter, vl_adapter  # noqa: F401
from clipzoo.zoo.adapters.base import ADAPTERS, AdapterConfig, ExpertContext, check_blocks, parse_kinds, register_adapter

__all__ = ["ADAPTERS", "AdapterConfig", "ExpertContext", "check_blocks", "parse_kinds", "register_adapter"]
