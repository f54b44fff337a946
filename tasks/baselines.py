"""Methods the benchmark compares, all on the same cached frozen features.

Each method learns tasks in order (``learn``) and answers two questions on features ``x``:
``agnostic(x, seen)`` -> (task index, class index) without task ids, choosing among the tasks in
``seen``; ``given(x, t)`` -> class index of task ``t`` with the task id given. ``unseen(x, t)``
answers for a task not learned yet (zero-shot transfer of the current model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.train import TrainSettings, fit

Pred = tuple[torch.Tensor, torch.Tensor]


def _split(logits: torch.Tensor, sizes: list[int], seen: list[int]) -> Pred:
    """argmax over concatenated class blocks -> (task index, class index within the task)."""
    flat = logits.argmax(1)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    block = torch.searchsorted(offsets[1:], flat, right=True)
    return torch.tensor(seen)[block], flat - offsets[block]


class ZeroShot:
    """Frozen CLIP with prompts: no training at all."""

    name = "zero-shot"
    uses_task_ids = False

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float):
        self.class_embs, self.scale = class_embs, logit_scale

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {}

    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        w = torch.cat([self.class_embs[t] for t in seen])
        return _split(x @ w.T, [len(self.class_embs[t]) for t in seen], seen)

    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return (x @ self.class_embs[t].T).argmax(1)

    unseen = given


class SharedAdapter(nn.Module):
    """One CLIP-Adapter shared by every task, with a growing text-initialised classifier."""

    def __init__(self, dim: int, logit_scale: float, reduction: int = 2, ratio: float = 0.5):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.ratio, self.scale = ratio, logit_scale
        self.heads = nn.ParameterList()
        self.active: list[int] = []

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * self.up(F.relu(self.down(x))) + (1 - self.ratio) * x, dim=-1)

    def logits(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return self.scale * self.adapt(x) @ F.normalize(torch.cat(weights), dim=-1).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, [self.heads[t] for t in self.active])


class NaiveSequential:
    """Naive sequential fine-tuning: the shared adapter and heads trained on each new task only,
    with a cross-entropy over every class seen so far (the classic forgetting baseline)."""

    name = "naive"
    uses_task_ids = False

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings):
        self.class_embs, self.train = class_embs, train
        self.model = SharedAdapter(class_embs[0].shape[1], logit_scale)

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        m = self.model
        m.heads.append(nn.Parameter(self.class_embs[t].clone()))
        m.active = list(range(len(m.heads)))
        offset = sum(len(self.class_embs[s]) for s in range(t))
        return fit(m, x, y + offset, self.train, extra_loss=self.extra_loss, desc=f"{self.name} {t}", progress=False)

    def extra_loss(self, model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor):
        """Regulariser added to the loss (none for naive; EWC/LwF-style variants override it)."""
        return None

    @torch.no_grad()
    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        m = self.model
        return _split(m.logits(x, [m.heads[t] for t in seen]), [len(m.heads[t]) for t in seen], seen)

    @torch.no_grad()
    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.logits(x, [self.model.heads[t]]).argmax(1)

    @torch.no_grad()
    def unseen(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.logits(x, [self.class_embs[t]]).argmax(1)
