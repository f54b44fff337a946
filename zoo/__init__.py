"""clipzoo: continual learning on a frozen CLIP with a zoo of per-task experts."""

__version__ = "0.1.0"
