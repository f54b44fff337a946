"""clipzoo: continual learning on a frozen CLIP with a zoo of per-task experts.

``from zoo import Zoo, BackboneSpec``; heavy modules are imported on first use.
"""

__version__ = "0.1.0"

_LAZY = {"Zoo": "zoo.zoo", "BackboneSpec": "zoo.backbone", "load_backbone": "zoo.backbone",
         "TrainSettings": "zoo.train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
