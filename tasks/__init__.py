"""Task specs, data (ImageFolder and built-in synthetic domains), sequences and the benchmark harness.

``from tasks import run_benchmark, load_task``; heavy modules are imported on first use.
"""

_LAZY = {"run_benchmark": "tasks.harness", "BenchSettings": "tasks.harness", "load_sequence": "tasks.sequence",
         "load_task": "tasks.data", "load_builtin": "tasks.data", "load_imagefolder": "tasks.data",
         "TaskData": "tasks.spec"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
