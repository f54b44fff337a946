"""Step checkpoints of one benchmark run, so a crashed run resumes from its finished steps.

``DIR/config.json`` names what the run is (settings, seed, order, backbone); ``DIR/step_NNN.json``
holds a finished step's accuracy rows and timings; ``DIR/state_NNN.safetensors`` the methods'
tensors after that step (``<method>/<key>``; only the latest is kept). A step counts as finished
only once its JSON is written, which happens after its state; every write is atomic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from clipzoo.errors import ConfigError
from clipzoo.zoo.registry import atomic_write_bytes



def _state(step: int) -> str:
    return f"state_{step:03d}.safetensors"


class StepStore:
    def __init__(self, folder: Path):
        self.dir = Path(folder)

    def start(self, config: dict, resume: bool) -> int:
        """Number of finished steps to reuse (0 without ``resume``); refuses a different config."""
        cfg_file = self.dir / "config.json"
        if resume and cfg_file.is_file():
            old = json.loads(cfg_file.read_text())
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                raise ConfigError(f"cannot resume {self.dir}: it was run with other {', '.join(diff)}; "
                                  "drop --resume to start afresh")
            n = 0
            while (self.dir / f"step_{n:03d}.json").is_file():
                n += 1
            if n == 0 or (self.dir / _state(n - 1)).is_file():
                return n
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        atomic_write_bytes(cfg_file, json.dumps(config, indent=2).encode())
        return 0

    def save(self, step: int, record: dict, states: dict[str, dict[str, torch.Tensor]]) -> None:
        flat = {f"{m}/{k}": v.detach().contiguous() for m, st in states.items() for k, v in st.items()}
        atomic_write_bytes(self.dir / _state(step), save(flat))
        atomic_write_bytes(self.dir / f"step_{step:03d}.json", json.dumps(record, indent=2).encode())
        for old in self.dir.glob("state_*.safetensors"):
            if old.name != _state(step):
                old.unlink()

    def record(self, step: int) -> dict:
        return json.loads((self.dir / f"step_{step:03d}.json").read_text())

    def states(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """The methods' tensors after ``step``, by method."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in load_file(str(self.dir / _state(step))).items():
            m, k = key.split("/", 1)
            out.setdefault(m, {})[k] = v
        return out
