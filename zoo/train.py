"""Training loops: AdamW on the expert's own parameters only; the frozen backbone is never an
optimiser parameter and stays in eval mode (it is not a sub-module of the expert)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.errors import ConfigError
from clipzoo.runtime import progress_bar


@dataclass
class TrainSettings:
    """How an expert is trained; checked when made (and again before training), so a NaN or
    infinite value is one ConfigError before any work, never all-NaN weights."""

    epochs: int = 20
    lr: float = 2e-3
    head_lr_scale: float = 0.1
    weight_decay: float = 1e-2
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> "TrainSettings":
        """Raise ConfigError (one line) for the first out-of-range or non-finite setting."""
        ints = {"epochs": 1, "batch_size": 1, "seed": 0}
        for key, low in ints.items():
            v = getattr(self, key)
            if type(v) is not int or v < low:
                raise ConfigError(f"training setting {key} must be an integer >= {low}, not {v!r}")
        floats = {"lr": (0.0, False), "head_lr_scale": (0.0, True), "weight_decay": (0.0, True)}
        for key, (low, inclusive) in floats.items():
            v = getattr(self, key)
            ok = type(v) in (int, float) and math.isfinite(v) and (v >= low if inclusive else v > low)
            if not ok:
                raise ConfigError(f"training setting {key} must be a finite number {'>=' if inclusive else '>'} "
                                  f"{low:g}, not {v!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def train_defaults(kind: str) -> dict:
    """Epochs and LR for a stack when the user gives none: the fewest epochs and the highest LR
    among its kinds' ``train_defaults``, else :class:`TrainSettings`'. Kinds inside an encoder pay a
    backbone forward and backward pass per step, so they default to half the epochs at a higher LR;
    each kind's values are checked on validation data with ``clipzoo bench-kinds --lrs``."""
    from clipzoo.zoo.adapters import ADAPTERS

    found = [ADAPTERS[k][0].train_defaults for k in kind.split("+") if k in ADAPTERS]
    return {"epochs": int(min([d["epochs"] for d in found if "epochs" in d], default=TrainSettings.epochs)),
            "lr": float(max([d["lr"] for d in found if "lr" in d], default=TrainSettings.lr))}


NO_DECAY = ("ctx",)  # soft prompt vectors: full LR, no weight decay


def param_groups(model: nn.Module, s: TrainSettings) -> list[dict]:
    """Three groups of the trainable parameters, by name:

    - adapter weight matrices (``ndim >= 2``): full LR with weight decay;
    - adapter norms and biases, and soft prompt vectors (named ``ctx``): full LR, no decay;
    - classifier heads (named ``head``): LR * ``head_lr_scale``, no decay.
    """
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.split(".")[-1]
        key = "head" if last == "head" else "no_decay" if last in NO_DECAY or p.ndim < 2 else "decay"
        groups[key].append(p)
    spec = {"decay": (s.lr, s.weight_decay), "no_decay": (s.lr, 0.0), "head": (s.lr * s.head_lr_scale, 0.0)}
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


Criterion = Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def fit(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, s: TrainSettings,
        extra_loss=None, desc: str = "train", criterion: Criterion = cross_entropy) -> dict:
    """Train ``model(*inputs) -> logits`` on ``criterion(logits, x, y)`` (default cross-entropy);
    ``extra_loss(model, x, y)`` is added (``x`` is the batch's inputs tuple). ``inputs`` is one
    tensor or a tuple of row-aligned tensors.

    Returns the final training loss, training accuracy and seconds taken.
    """
    g = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    opt = torch.optim.AdamW(param_groups(model, s))
    n = len(labels)
    steps = max(1, s.epochs * ((n + s.batch_size - 1) // s.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model.train()
    loss = torch.tensor(0.0)
    with progress_bar(total=steps, desc=desc) as bar:
        for _ in range(s.epochs):
            perm = torch.randperm(n, generator=g)
            for b in range(0, n, s.batch_size):
                idx = perm[b:b + s.batch_size]
                x, y = tuple(t[idx] for t in inputs), labels[idx]
                loss = criterion(model(*x), x, y)
                extra = extra_loss(model, x, y) if extra_loss is not None else None
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    model.eval()
    seconds = time.perf_counter() - t0
    bs = 4 * s.batch_size
    with torch.no_grad():
        pred = torch.cat([model(*(t[b:b + bs] for t in inputs)).argmax(1) for b in range(0, n, bs)])
    acc = (pred == labels).float().mean().item()
    return {"train_loss": float(loss.item()), "train_acc": acc, "train_seconds": seconds}
