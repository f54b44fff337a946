"""clipzoo: continual learning on a frozen CLIP with a zoo of per-task experts.

One namespace over the repository's layers (see the README's tree): ``clipzoo.tasks`` (what a
task is), ``clipzoo.router`` (math over features), ``clipzoo.zoo`` (backbone, experts, store,
prediction, Hub), ``clipzoo.bench`` (benchmarks) and ``clipzoo.cli``. ``from clipzoo import Zoo``;
the heavy modules are imported on first use, so ``import clipzoo`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {"Zoo": "clipzoo.zoo.zoo", "BackboneSpec": "clipzoo.zoo.backbone", "load_backbone": "clipzoo.zoo.backbone",
         "TrainSettings": "clipzoo.zoo.train", "load_task": "clipzoo.tasks.data", "TaskData": "clipzoo.tasks.spec",
         "run_benchmark": "clipzoo.bench.harness", "BenchSettings": "clipzoo.bench.harness"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipzoo' has no attribute {name!r}")
