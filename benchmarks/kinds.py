"""Expert kinds side by side: accuracy, size, training time and inference overhead, in one run.

On each domain of ``--data-dir`` (ImageFolder layout) every method gets the same train/test
split, the same seed and the same :class:`clipzoo.zoo.train.TrainSettings` but for the epochs and LR:
each kind's defaults (:func:`clipzoo.zoo.train.train_defaults`, what ``clipzoo add-task`` uses) unless
``--epochs`` / ``--lr`` fix them for all; ``zero-shot`` is the frozen backbone's prompt-ensemble classifier. Task ids are given (each expert is evaluated on its own
task), so the numbers are oracle accuracies of the expert, not routed ones.

- ``train s``: wall-clock seconds of :func:`clipzoo.zoo.train.fit` (pixels preprocessed beforehand);
- ``ms/img``: median over ``--repeats`` of the zoo's inference path for one batch of test
  images (frozen encoder for the routing features, then the expert; text classifiers are cached),
  divided by the batch size; ``overhead`` compares it with the frozen backbone's zero-shot path,
  measured interleaved with it.

Usage::

    clipzoo bench-kinds data/mnist data/cifar10 --out bench-kinds
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from clipzoo.tasks.data import TaskData, load_task, open_image
from clipzoo.bench.harness import machine_info
from clipzoo.tasks.metrics import accuracy
from clipzoo.zoo.adapters import parse_kinds
from clipzoo.zoo.backbone import BackboneSpec, load_backbone
from clipzoo.zoo.experts import build_expert
from clipzoo.zoo.train import TrainSettings, fit, train_defaults

METHODS = ["clip-adapter", "cross-modal", "prompt", "lora", "vit-adapter", "vl-adapter",
           "lora+prompt", "vit-adapter+clip-adapter"]


def _pixels(bb, images) -> torch.Tensor:
    return torch.stack([bb.preprocess(open_image(im)) for im in images])


def _batched(fn, *tensors, bs: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(*(t[b:b + bs] for t in tensors)) for b in range(0, len(tensors[0]), bs)])


def _latency(path, frozen, repeats: int) -> tuple[float, float]:
    """Median seconds of ``path()`` and ``frozen()``, measured alternately after one warm-up each."""
    with torch.no_grad():
        path(), frozen()
        t_path, t_frozen = [], []
        for _ in range(repeats):
            for fn, out in ((frozen, t_frozen), (path, t_path)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return statistics.median(t_path), statistics.median(t_frozen)


def run_domain(bb, task: TaskData, methods: list[str], s: TrainSettings, fixed: dict, repeats: int,
               batch: int, echo=print) -> list[dict]:
    px_tr, px_te = _pixels(bb, task.train.images), _pixels(bb, task.test.images)
    y_tr, y_te = torch.tensor(task.train.labels), torch.tensor(task.test.labels)
    x_tr, x_te = _batched(bb.encode_images, px_tr), _batched(bb.encode_images, px_te)
    px_lat = px_te[:batch]
    w = bb.class_embeddings(task.classes, task.templates)

    def zero_shot(f: torch.Tensor) -> torch.Tensor:
        return bb.logit_scale * f @ w.T

    def frozen() -> torch.Tensor:
        return zero_shot(bb.encode_images(px_lat))

    acc = accuracy(_batched(zero_shot, x_te).argmax(1), y_te)
    t_path, t_frozen = _latency(frozen, frozen, repeats)
    rows = [{"domain": task.name, "method": "zero-shot", "test_acc": acc, "trainable_params": 0,
             "trainable_share": 0.0, "epochs": 0, "lr": 0.0, "train_seconds": 0.0, "ms_per_image": 1000 * t_path / len(px_lat),
             "overhead": t_path / t_frozen - 1}]
    echo(_row(rows[-1]))
    for kind in methods:
        torch.manual_seed(s.seed)
        exp = build_expert(kind, bb, task.classes, task.templates)
        inputs = (x_tr, px_tr) if exp.needs_pixels else (x_tr,)
        s = replace(s, **{**train_defaults(kind), **fixed})
        hist = fit(exp, inputs, y_tr, s, criterion=exp.criterion)
        exp.eval()
        acc = accuracy(_batched(exp, x_te, px_te).argmax(1), y_te)
        t_path, t_frozen = _latency(lambda: exp(bb.encode_images(px_lat), px_lat), frozen, repeats)
        n = exp.trainable_params()
        rows.append({"domain": task.name, "method": kind, "test_acc": acc, "trainable_params": n,
                     "trainable_share": n / bb.num_params, "epochs": s.epochs, "lr": s.lr, "train_seconds": hist["train_seconds"],
                     "ms_per_image": 1000 * t_path / len(px_lat), "overhead": t_path / t_frozen - 1})
        echo(_row(rows[-1]))
    return rows


HEADER = ("| domain | method | test acc | trainable params | share of backbone | epochs | lr | train s | ms/img "
          "| overhead vs frozen |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['domain']} | {r['method']} | {r['test_acc']:.3f} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_share']:.2f}% | {r['epochs']} | {r['lr']:g} | {r['train_seconds']:.1f} | {r['ms_per_image']:.3f} | "
            f"{100 * r['overhead']:+.0f}% |")


def markdown(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [_row(r) for r in rows])


def run_kinds_bench(domains: list[str], methods: list[str] = METHODS, epochs: int | None = None,
                    lr: float | None = None, seed: int = 0, repeats: int = 7, batch: int = 128,
                    backbone: BackboneSpec = BackboneSpec(), out: Path | None = None, echo=print) -> dict:
    """Every method on every domain (DIRs or ``builtin:<domain>``); writes kinds.json/kinds.md to ``out``."""
    for m in methods:
        parse_kinds(m)  # an unknown kind fails before any work
    tasks = [load_task(d) for d in domains]  # bad data fails before any work
    bb = load_backbone(backbone)
    s = TrainSettings(seed=seed)
    fixed = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    echo(HEADER)
    rows = []
    for task in tasks:
        rows += run_domain(bb, task, methods, s, fixed, repeats, batch, echo)
    res = {"backbone": str(bb.spec), "backbone_params": bb.num_params, "train": {**s.to_dict(), **fixed},
           "latency": {"batch": batch, "repeats": repeats}, "machine": machine_info(),
           "task_ids": "given (oracle)", "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kinds.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "kinds.md").write_text(markdown(rows) + "\n")
    return res
