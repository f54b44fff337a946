"""Training loops on cached frozen features: AdamW on the expert's own parameters only."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass
class TrainSettings:
    epochs: int = 20
    lr: float = 2e-3
    head_lr_scale: float = 0.1
    weight_decay: float = 1e-2
    batch_size: int = 64
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def param_groups(model: nn.Module, s: TrainSettings) -> list[dict]:
    """Adapters: full LR with weight decay; classifier heads ('head' in the name): lower LR, no decay."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[-1] == "head"]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[-1] != "head"]
    groups = [{"params": rest, "lr": s.lr, "weight_decay": s.weight_decay}]
    if heads:
        groups.append({"params": heads, "lr": s.lr * s.head_lr_scale, "weight_decay": 0.0})
    return groups


def fit(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, s: TrainSettings,
        extra_loss=None, desc: str = "train", progress: bool = True) -> dict:
    """Cross-entropy training of ``model(*inputs) -> logits``; ``extra_loss(model, x, y)`` is added
    (``x`` is the batch's inputs tuple). ``inputs`` is one tensor or a tuple of row-aligned tensors.

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
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(s.epochs):
            perm = torch.randperm(n, generator=g)
            for b in range(0, n, s.batch_size):
                idx = perm[b:b + s.batch_size]
                x, y = tuple(t[idx] for t in inputs), labels[idx]
                loss = F.cross_entropy(model(*x), y)
                extra = extra_loss(model, x, y) if extra_loss is not None else None
                if extra is not None:
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    model.eval()
    with torch.no_grad():
        acc = (model(*inputs).argmax(1) == labels).float().mean().item()
    return {"train_loss": float(loss.item()), "train_acc": acc, "train_seconds": time.perf_counter() - t0}
