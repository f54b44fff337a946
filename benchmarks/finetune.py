"""Full fine-tuning baselines in pixel space: the backbone's towers themselves are trained.

Unlike the shared-adapter baselines (:mod:`clipzoo.bench.baselines`), which learn on cached frozen
features, these copy the whole open_clip model and fine-tune it on preprocessed pixels
(:mod:`clipzoo.bench.pixels`); the frozen backbone (``bb.model``) is never modified and serves as
the teacher. Every method classifies an image by the cosine similarity of its image embedding to
the class-name text embeddings (prompt templates averaged, as zero-shot CLIP), times the
backbone's logit scale, and answers like the other baselines: ``agnostic`` over the union of the
seen tasks' classes, ``given`` over one task's classes, ``unseen`` over a task not learned yet
from its class names (real transfer through the fine-tuned towers). Training draws ``steps``
minibatches per task (a fixed iteration budget per task, as ZSCL's 1000 iterations; reshuffled
each pass over the data) with AdamW (no weight decay, so tokens that no prompt uses stay as they
were) and a cosine learning-rate decay; the logit scale stays fixed. The towers run under bfloat16
autocast on the CPU (``FTSettings.bf16``; weights, optimiser state and losses in float32), which
about halves the cost of encoding every test image at every step.

- ``ft-naive`` (ZSCL's "continual FT"): the image tower fine-tuned on each task in turn with a
  cross-entropy over that task's classes, whose frozen class-text embeddings are the classifier.
- ``ft-zscl`` (ZSCL, Zheng et al., ICCV 2023): both towers fine-tuned; cross-entropy on the task's
  classes (text embeddings from the current text tower) plus ``weight * (L_img + L_txt)``:
  on a minibatch of reference images and the whole reference vocabulary, ``L_img`` is the
  distillation ``T^2 KL(softmax(z0/T) || softmax(z/T))`` of the current image-to-text logits ``z``
  (current image and text towers; ``ref_batch`` reference images per step) to the frozen model's
  ``z0``, and ``L_txt`` the same on the
  transposed (text-to-image) logits; ``T = 2``. Weight ensembling: every ``avg_every`` steps the
  running average ``theta_hat <- (n * theta_hat + theta) / (n + 1)`` takes in the current weights,
  starting from ``theta_hat = `` the model before the task (``n = 1``), so the result is a
  WiSE-FT-like average of the previous model and the fine-tuning trajectory; it becomes the model
  (evaluated, and the start of the next task). ZSCL's optional parameter-space L2 term and label
  smoothing are not used. The reference set: :func:`clipzoo.bench.pixels.reference_set`.
- ``clip-cite`` (CLIP-CITE, Liu, Li & Yu 2024, "Fully Fine-tuned CLIP Models are Efficient
  Few-Shot Learners"): both towers fine-tuned with the cross-entropy (image to class texts), a
  discriminative visual-text term (text to image: each class text of the batch must pick out the
  batch's images of its class, a multi-positive supervised contrastive loss) and the
  vision-language similarity distillation ``weight * T^2 KL(softmax(s0/T) || softmax(s/T))`` of
  the training images' image-to-class-text similarities ``s`` to the frozen CLIP's ``s0``
  (frozen image features and frozen class-text embeddings; ``T = 2``). This follows the paper's
  abstract and summary (full fine-tuning + discriminative visual-text task + similarity
  distillation to the frozen model); its exact loss weights and schedules are not reproduced.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipzoo.bench.baselines import _kd, _split, numel
from clipzoo.zoo.backbone import Backbone, prompt_texts

Pred = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FTSettings:
    """Budget and optimiser of the fine-tuning baselines (chosen for a 2-CPU run, see README)."""

    lr: float = 1e-4
    steps: int = 20  # minibatches per task
    batch_size: int = 64
    weight: float = 1.0  # the distillation weight (ft-zscl, clip-cite)
    temperature: float = 2.0
    avg_every: int = 5  # ft-zscl's weight-ensembling interval (steps)
    ref_per_class: int = 10  # ft-zscl's reference images per reference class
    ref_batch: int = 32  # ft-zscl's reference images per step
    bf16: bool = True  # bfloat16 autocast for the towers' matmuls (weights, optimiser and losses stay float32)
    threads: int = 0  # torch threads while fine-tuning or encoding pixels (0: keep the caller's)
    eval_batch: int = 256


def _autocast(s: FTSettings):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16)


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class FineTune:
    """``ft-naive``: continual full fine-tuning of the image tower (see the module docstring)."""

    name = "ft-naive"
    note = "continual full fine-tuning of the image tower in pixel space (ZSCL's continual FT)"
    space = "pixels"  # the harness passes preprocessed pixels, not cached features
    train_text = False

    def __init__(self, bb: Backbone, class_embs: list[torch.Tensor], texts: list[tuple[list[str], list[str]]],
                 settings: FTSettings = FTSettings()):
        self.bb, self.class_embs, self.texts, self.s = bb, class_embs, texts, settings
        self.teacher = bb.model  # frozen; only ever read under no_grad
        self.model = copy.deepcopy(bb.model).eval()
        self.scale = bb.logit_scale
        self.trainable = [n for n, _ in self.model.named_parameters()
                          if n != "logit_scale" and n != "logit_bias" and (self.train_text or n.startswith("visual."))]
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in self.trainable)
        self.current, self.version = -1, 0
        self._memo: dict = {}
        self._tokens: dict[int, torch.Tensor] = {}

    # ----- text side --------------------------------------------------------------------------
    def _tok(self, t: int) -> torch.Tensor:
        if t not in self._tokens:
            classes, templates = self.texts[t]
            self._tokens[t] = self.bb.tokenizer(prompt_texts(classes, templates))
        return self._tokens[t]

    def class_weights(self, t: int) -> torch.Tensor:
        """Task ``t``'s classifier ``(C, D)``: frozen text embeddings, or the current text tower's
        (prompt templates averaged, unit-normed), with gradients when called while training."""
        if not self.train_text:
            return self.class_embs[t]
        classes, templates = self.texts[t]
        e = F.normalize(self.model.encode_text(self._tok(t)).float(), dim=-1).view(len(classes), len(templates), -1)
        e = e.mean(1)
        return F.normalize(e, dim=-1)

    def _weights(self, t: int) -> torch.Tensor:
        key = ("w", t, self.version)
        if key not in self._memo:
            with torch.no_grad():
                self._memo[key] = self.class_weights(t)
        return self._memo[key]

    # ----- image side -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of pixels with the current image tower (memoised per input
        tensor and model version, so ``agnostic`` and ``given`` on one batch encode it once)."""
        key = ("x", id(x), x.data_ptr(), tuple(x.shape), self.version)
        if key not in self._memo:
            with torch.inference_mode(), _threads(self.s.threads), _autocast(self.s):
                b = self.s.eval_batch
                out = torch.cat([F.normalize(self.model.encode_image(x[i:i + b]).float(), dim=-1)
                                 for i in range(0, len(x), b)]) if len(x) else torch.empty(0, self.bb.embed_dim)
            self._memo = {k: v for k, v in self._memo.items() if k[0] == "w" and k[2] == self.version}
            self._memo[key] = out.clone()
        return self._memo[key]

    def clear_cache(self) -> None:
        """Forget memoised embeddings (for timing)."""
        self._memo = {}

    # ----- training ---------------------------------------------------------------------------
    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor, frozen: torch.Tensor | None = None) -> dict:
        """Fine-tune on task ``t``'s pixels ``x`` and labels ``y``; ``frozen`` may give the frozen
        backbone's image features of ``x`` (the harness's cached features), else they are computed."""
        t0 = time.perf_counter()
        self.current = t
        params = [p for n, p in self.model.named_parameters() if n in self.trainable]
        opt = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=0.0)
        steps, bs = self.s.steps, min(self.s.batch_size, len(y))
        losses = []
        with _threads(self.s.threads):
            self.begin_task(t, x, frozen)
            order, pos = torch.randperm(len(y)), 0
            for k in range(steps):
                if pos + bs > len(y):
                    order, pos = torch.randperm(len(y)), 0
                idx = order[pos:pos + bs]
                pos += bs
                for g in opt.param_groups:
                    g["lr"] = self.s.lr * 0.5 * (1 + math.cos(math.pi * k / steps))
                with _autocast(self.s):
                    loss = self.loss(t, x[idx], y[idx], idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                self.after_step(k)
            self.end_task(t)
        self.version += 1
        self._memo = {}
        return {"loss": losses, "train_seconds": time.perf_counter() - t0}

    def logits(self, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training logits over task ``t``'s classes, the image embeddings), with gradients."""
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        w = self.class_weights(t).float()
        return self.scale * img @ w.T, img

    def loss(self, t: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(t, x)[0], y)

    def begin_task(self, t: int, x: torch.Tensor, frozen: torch.Tensor | None) -> None:
        """Called before the first step of a task."""

    def after_step(self, k: int) -> None:
        """Called after each optimiser step (``k`` from 0)."""

    def end_task(self, t: int) -> None:
        """Called after the last step of a task."""

    # ----- answers ----------------------------------------------------------------------------
    def agnostic(self, x: torch.Tensor, seen: list[int]) -> Pred:
        e = self.embed(x)
        ws = [self._weights(t) for t in seen]
        return _split(self.scale * e @ torch.cat(ws).T, [len(w) for w in ws], seen)

    def given(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return (self.embed(x) @ self._weights(t).T).argmax(1)

    unseen = given  # the class names of a task not learned yet, through the fine-tuned towers

    # ----- costs and checkpoints --------------------------------------------------------------
    def trainable_params(self) -> int:
        params = dict(self.model.named_parameters())
        return numel(params[n] for n in self.trainable)

    def stored_params(self) -> int:
        """The fine-tuned weights kept between tasks (the frozen backbone is shared, not counted)."""
        return self.trainable_params()

    def stored_images(self) -> int:
        return 0

    def state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {f"model.{n}": params[n].detach().clone() for n in self.trainable}

    def restore(self, state: dict[str, torch.Tensor], data: list) -> None:
        """Back to the state after the tasks in ``data`` (the fine-tuned weights; nothing else)."""
        got = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        if set(got) != set(self.trainable):
            raise KeyError(f"{self.name}: checkpoint holds other parameters than the fine-tuned towers")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in got.items():
                params[n].copy_(v)
        self.current, self.version, self._memo = len(data) - 1, self.version + 1, {}


class FTZSCL(FineTune):
    """``ft-zscl``: ZSCL, reference-set distillation in image and text space plus weight ensembling."""

    name = "ft-zscl"
    note = "ZSCL: both towers fine-tuned, distilled to the frozen CLIP on a reference set, weight ensembling"
    train_text = True

    def __init__(self, bb: Backbone, class_embs: list[torch.Tensor], texts: list[tuple[list[str], list[str]]],
                 settings: FTSettings, reference: torch.Tensor, ref_texts: list[str], ref_note: str = ""):
        super().__init__(bb, class_embs, texts, settings)
        self.ref, self.ref_tok = reference, bb.tokenizer(ref_texts)
        self.note = f"{self.note}; {ref_note}" if ref_note else self.note
        with torch.no_grad(), _threads(settings.threads):
            self.ref_img0 = F.normalize(self.teacher.encode_image(reference), dim=-1)
            self.ref_txt0 = F.normalize(self.teacher.encode_text(self.ref_tok), dim=-1)
        self.avg: dict[str, torch.Tensor] = {}
        self.n_avg = 0

    def loss(self, t: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(self.logits(t, x)[0], y)
        r = torch.randperm(len(self.ref))[: self.s.ref_batch]
        img = F.normalize(self.model.encode_image(self.ref[r]).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.ref_tok).float(), dim=-1)
        z, z0 = self.scale * img @ txt.T, self.scale * self.ref_img0[r] @ self.ref_txt0.T
        T = self.s.temperature
        return ce + self.s.weight * (_kd(z0, z, T) + _kd(z0.T, z.T, T))

    def begin_task(self, t: int, x: torch.Tensor, frozen: torch.Tensor | None) -> None:
        params = dict(self.model.named_parameters())
        self.avg = {n: params[n].detach().clone() for n in self.trainable}
        self.n_avg = 1

    def after_step(self, k: int) -> None:
        if (k + 1) % self.s.avg_every:
            return
        params = dict(self.model.named_parameters())
        for n, a in self.avg.items():
            a.mul_(self.n_avg).add_(params[n].detach()).div_(self.n_avg + 1)
        self.n_avg += 1

    def end_task(self, t: int) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, a in self.avg.items():
                params[n].copy_(a)
        self.avg = {}

    def stored_params(self) -> int:
        """The fine-tuned towers plus the frozen model's embeddings of the reference set."""
        return super().stored_params() + numel([self.ref_img0, self.ref_txt0])

    def stored_images(self) -> int:
        """The reference images (kept for every task; never a task's image)."""
        return len(self.ref)


class CLIPCITE(FineTune):
    """``clip-cite``: full fine-tuning with a discriminative visual-text term and similarity
    distillation to the frozen CLIP (see the module docstring)."""

    name = "clip-cite"
    note = "CLIP-CITE: both towers fine-tuned, image-text similarity distilled to the frozen CLIP"
    train_text = True

    def begin_task(self, t: int, x: torch.Tensor, frozen: torch.Tensor | None) -> None:
        self.frozen = None if frozen is None else F.normalize(frozen.float(), dim=-1)

    def loss(self, t: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:  # the frozen backbone's features of x (the harness's cache)
            f0 = self.frozen[idx]
        else:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                f0 = F.normalize(self.teacher.encode_image(x), dim=-1)
        s0 = self.scale * f0 @ self.class_embs[t].T
        z, img = self.logits(t, x)
        ce = F.cross_entropy(z, y)
        present = torch.unique(y)
        pos = (y[None, :] == present[:, None]).float()  # (classes in batch, images)
        t2i = F.log_softmax(z.T[present], dim=1)  # each present class text over the batch's images
        sup = -((pos * t2i).sum(1) / pos.sum(1)).mean()
        return ce + sup + self.s.weight * _kd(s0, z, self.s.temperature)


FT_METHODS = {"ft-naive": FineTune, "ft-zscl": FTZSCL, "clip-cite": CLIPCITE}
