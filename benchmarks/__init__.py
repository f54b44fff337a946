"""Floor 4 (``clipzoo.bench``): the forgetting benchmark, its baselines and reports, the other
bench commands, and maintainer tools (the tiny backbone's pretraining); apart from the library,
as ``open_clip_train`` is apart from ``open_clip``."""
