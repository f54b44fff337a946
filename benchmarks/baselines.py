"""Methods the benchmark compares with the zoo, all on the same cached frozen features.

Each method learns tasks in order (``learn``) and answers on features ``x``:
``agnostic(x, seen)`` -> (task index, class index) without task ids, choosing among the tasks in
``seen``; ``given(x, t)`` -> class index of task ``t`` with the task id given; ``unseen(x, t)``
answers for a task not learned yet (zero-shot transfer of the current model, from the task's
class-name text embeddings). ``state()`` / ``restore()`` let a crashed benchmark resume.

The learning methods here (named ``adapter-*`` in the benchmark: none of them touches the CLIP
towers; the full-fine-tuning baselines are in :mod:`clipzoo.bench.finetune`) share one
CLIP-Adapter (the zoo's expert architecture) and a growing, text-initialised classifier; they
differ only in what they add to the cross-entropy:

- ``adapter-naive``: nothing (sequential fine-tuning of the adapter, the forgetting baseline);
- ``adapter-ewc``: ``lam/2 * sum_k F_k (theta_k - theta*_k)^2`` with the diagonal empirical Fisher ``F``
  summed over past tasks (online EWC, anchor = parameters after the last task; Kirkpatrick 2017);
- ``adapter-lwf``: ``alpha * T^2 * KL(p_old^T || p_new^T)`` on the old classes' logits of the current
  task's inputs, ``p_old`` from the model as it was before the task (Li & Hoiem 2016);
- ``adapter-zscl``: ``beta * T^2 * KL(p_clip^T || p_new^T)`` over a reference vocabulary (seen classes and
  the reference texts of :func:`clipzoo.bench.pixels.reference_set`: the built-in domains' class
  names, those in the sequence left out), on the current task's features, ``p_clip`` from the frozen
  CLIP's image-text similarities (a ZSCL-style distillation on the adapter; no reference images, no
  weight ensembling: ZSCL itself is ``ft-zscl``);
- ``adapter-joint``: the same shared adapter and heads retrained from scratch at each step on the
  features of every task seen so far (keeps all training data; not a continual method, and no
  bound on the others: a classifier built from stored statistics, ``slda``, can beat it).

The training-free ``slda`` baseline lives in :mod:`clipzoo.bench.slda`.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.zoo.train import TrainSettings, fit

Pred = tuple[torch.Tensor, torch.Tensor]
Data = list[tuple[torch.Tensor, torch.Tensor]]


def _split(logits: torch.Tensor, sizes: list[int], seen: list[int]) -> Pred:
    """argmax over concatenated class blocks -> (task index, class index within the task)."""
    flat = logits.argmax(1)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    block = torch.searchsorted(offsets[1:], flat, right=True)
    return torch.tensor(seen)[block], flat - offsets[block]


def _kd(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="batchmean")


def numel(tensors) -> int:
    return sum(int(t.numel()) for t in tensors)


class ZeroShot:
    """Frozen CLIP with prompts: no training at all."""

    name = "zero-shot"
    note = "frozen CLIP, class-name prompts"

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float):
        self.class_embs, self.scale = class_embs, logit_scale

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {"train_seconds": 0.0}

    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        w = torch.cat([self.class_embs[t] for t in seen])
        return _split(x @ w.T, [len(self.class_embs[t]) for t in seen], seen)

    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return (x @ self.class_embs[t].T).argmax(1)

    unseen = given

    def trainable_params(self) -> int:
        return 0

    def stored_params(self) -> int:
        return 0

    def stored_images(self) -> int:
        return 0

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        """Nothing to restore."""


class _Head(nn.Module):
    """One task's classifier; the parameter is named ``head`` so it trains like the experts' heads."""

    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.head = nn.Parameter(emb.detach().clone().float())


class SharedAdapter(nn.Module):
    """One CLIP-Adapter shared by every task, with a growing text-initialised classifier."""

    def __init__(self, dim: int, logit_scale: float, reduction: int = 2, ratio: float = 0.5):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.ratio, self.scale = ratio, logit_scale
        self.heads = nn.ModuleList()

    def add_head(self, emb: torch.Tensor) -> None:
        self.heads.append(_Head(emb))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * self.up(F.relu(self.down(x))) + (1 - self.ratio) * x, dim=-1)

    def logits(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return self.scale * self.adapt(x) @ F.normalize(torch.cat(weights), dim=-1).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes of every head, in task order."""
        return self.logits(x, [h.head for h in self.heads])


class NaiveSequential:
    """Naive sequential fine-tuning: the shared adapter and heads trained on each new task only,
    with a cross-entropy over every class seen so far (the classic forgetting baseline)."""

    name = "adapter-naive"
    note = "sequential fine-tuning of one shared CLIP-Adapter on cached frozen features"

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings):
        self.class_embs, self.train, self.scale = class_embs, train, logit_scale
        self.model = SharedAdapter(class_embs[0].shape[1], logit_scale)
        self.current = -1

    def offset(self, t: int) -> int:
        return sum(len(self.class_embs[s]) for s in range(t))

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        self.current = t
        self.before_task(t)
        self.model.add_head(self.class_embs[t])
        yy = y + self.offset(t)
        hist = fit(self.model, x, yy, self.train, extra_loss=self.extra_loss, desc=f"{self.name} {t}")
        self.after_task(t, x, yy)
        return {**hist, "train_seconds": time.perf_counter() - t0}

    def before_task(self, t: int) -> None:
        """Called before the new task's head is added (LwF keeps the old model here)."""

    def after_task(self, t: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called after training on task ``t`` with its global labels (EWC computes its Fisher here)."""

    def extra_loss(self, model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor | None:
        """Regulariser added to the loss (none for naive)."""
        return None

    @torch.no_grad()
    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        m = self.model
        return _split(m.logits(x, [m.heads[t].head for t in seen]), [len(m.heads[t].head) for t in seen], seen)

    @torch.no_grad()
    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.logits(x, [self.model.heads[t].head]).argmax(1)

    @torch.no_grad()
    def unseen(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.logits(x, [self.class_embs[t]]).argmax(1)

    def trainable_params(self) -> int:
        return numel(p for p in self.model.parameters() if p.requires_grad)

    def stored_params(self) -> int:
        """Numbers kept between tasks (the model, plus whatever a regulariser keeps)."""
        return numel(self.model.state_dict().values())

    def stored_images(self) -> int:
        """Training images kept for later tasks (none: only joint training keeps them)."""
        return 0

    def state(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        """Back to the state after learning the tasks in ``data`` (one (x, y) per finished task)."""
        for t in range(len(self.model.heads), len(data)):
            self.model.add_head(self.class_embs[t])
        self.current = len(data) - 1
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=True)


class EWC(NaiveSequential):
    """Online EWC: a diagonal-Fisher quadratic pull towards the parameters after the last task."""

    name = "adapter-ewc"
    note = "adapter-naive + elastic weight consolidation"

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings, lam: float = 1e3):
        super().__init__(class_embs, logit_scale, train)
        self.lam = lam
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def extra_loss(self, model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor | None:
        if not self.fisher:
            return None
        pen = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
                  for n, p in model.named_parameters() if n in self.fisher)
        return 0.5 * self.lam * pen

    def after_task(self, t: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Empirical Fisher: squared minibatch gradients of the cross-entropy, averaged over minibatches."""
        m, bs = self.model, self.train.batch_size
        f = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
        batches = range(0, len(y), bs)
        for b in batches:
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[b:b + bs]), y[b:b + bs]).backward()
            for n, p in m.named_parameters():
                f[n] += p.grad.detach() ** 2 / len(batches)
        m.zero_grad(set_to_none=True)
        self.fisher = {n: v + self.fisher.get(n, torch.zeros_like(v)) for n, v in f.items()}
        self.anchor = {n: p.detach().clone() for n, p in m.named_parameters()}

    def stored_params(self) -> int:
        return super().stored_params() + numel(self.fisher.values()) + numel(self.anchor.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {**super().state(), **{f"fisher.{k}": v for k, v in self.fisher.items()},
                **{f"anchor.{k}": v for k, v in self.anchor.items()}}

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        super().restore(state, data)
        self.fisher = {k[7:]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v for k, v in state.items() if k.startswith("anchor.")}


class LwF(NaiveSequential):
    """Learning without Forgetting: distil the previous model's old-class outputs on new inputs."""

    name = "adapter-lwf"
    note = "adapter-naive + distillation from the previous model"

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings,
                 alpha: float = 1.0, temperature: float = 2.0):
        super().__init__(class_embs, logit_scale, train)
        self.alpha, self.temperature = alpha, temperature
        self.prev: SharedAdapter | None = None

    def before_task(self, t: int) -> None:
        self.prev = copy.deepcopy(self.model).eval() if t > 0 else None

    def extra_loss(self, model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor | None:
        if self.prev is None:
            return None
        with torch.no_grad():
            old = self.prev(*x)
        return self.alpha * _kd(old, model(*x)[:, : old.shape[1]], self.temperature)

    def stored_params(self) -> int:
        """The model and a copy of it (the teacher for the next task)."""
        return 2 * super().stored_params()


class ZSCL(NaiveSequential):
    """ZSCL / CLIP-CITE-style: keep the adapted image-text similarities close to the frozen CLIP's."""

    name = "adapter-zscl"
    note = ("adapter-naive + distillation towards frozen CLIP image-text similarities over a reference "
            "vocabulary (no reference images, no weight ensembling)")

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings,
                 reference: torch.Tensor | None = None, beta: float = 1.0, temperature: float = 2.0):
        super().__init__(class_embs, logit_scale, train)
        self.reference = reference if reference is not None else torch.empty(0, class_embs[0].shape[1])
        self.beta, self.temperature = beta, temperature

    def vocabulary(self) -> torch.Tensor:
        """Frozen text embeddings: every seen task's classes and the fixed reference texts."""
        return torch.cat([*self.class_embs[: self.current + 1], self.reference])

    def extra_loss(self, model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor | None:
        w = self.vocabulary()
        clip = self.scale * x[0] @ w.T
        return self.beta * _kd(clip, self.scale * model.adapt(x[0]) @ w.T, self.temperature)


class Joint(NaiveSequential):
    """Joint training: the shared adapter and heads retrained from scratch at each step on every
    task seen so far (stores all training features)."""

    name = "adapter-joint"
    note = "shared CLIP-Adapter retrained from scratch on all training data seen so far (keeps every image)"

    def __init__(self, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings):
        super().__init__(class_embs, logit_scale, train)
        self.data: Data = []

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        self.data.append((x, y))
        self.current = t
        self.model = SharedAdapter(self.class_embs[0].shape[1], self.scale)
        for s in range(t + 1):
            self.model.add_head(self.class_embs[s])
        xs = torch.cat([d[0] for d in self.data])
        ys = torch.cat([d[1] + self.offset(s) for s, d in enumerate(self.data)])
        hist = fit(self.model, xs, ys, self.train, desc=f"joint {t}")
        return {**hist, "train_seconds": time.perf_counter() - t0}

    def stored_images(self) -> int:
        return sum(len(d[1]) for d in self.data)

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        super().restore(state, data)
        self.data = list(data)
