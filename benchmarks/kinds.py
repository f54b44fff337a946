"""Expert kinds side by side: accuracy, size, training time and inference overhead, in one run.

On each domain (an ImageFolder DIR or ``builtin:<domain>``) a validation split is carved from the
training split (:func:`clipzoo.tasks.validation.validation_split`, ``--val-fraction`` of each class,
validation seed ``DEFAULT_SEED``); every method trains on the rest only, with the same seed and the
same :class:`clipzoo.zoo.train.TrainSettings` but for the epochs and LR: each kind's defaults
(:func:`clipzoo.zoo.train.train_defaults`, what ``clipzoo add-task`` uses) unless ``--epochs`` /
``--lr`` fix them for all; ``zero-shot`` is the frozen backbone's prompt-ensemble classifier. Each row
gives ``val acc`` (the carved images, which no model saw) and ``test acc`` (the real test split,
which only reports). Task ids are given (each expert is evaluated on its own task), so the numbers
are oracle accuracies of the expert, not routed ones.

``--lrs a,b,c`` runs each kind at each of those LRs (epochs from the defaults or ``--epochs``) and
names, per (domain, kind), the LR that scored best on validation (``chosen_on_validation``; on a
tie the kind's default, then the first given) and whether it is the kind's default: a check of
the defaults on data no choice was tested on.

- ``train s``: wall-clock seconds of :func:`clipzoo.zoo.train.fit` (pixels preprocessed beforehand);
- ``ms/img``: median over ``--repeats`` of the zoo's inference path for one batch of test
  images (frozen encoder for the routing features, then the expert; text classifiers are cached),
  divided by the batch size; ``overhead`` compares it with the frozen backbone's zero-shot path,
  measured interleaved with it.

Usage::

    clipzoo bench-kinds data/mnist data/cifar10 --out bench-kinds
    clipzoo bench-kinds data/mnist --methods lora,prompt --lrs 1e-3,3e-3,1e-2
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from clipzoo.errors import ConfigError
from clipzoo.tasks.data import TaskData, load_task, open_image
from clipzoo.bench.harness import machine_info
from clipzoo.bench.timing import alternating
from clipzoo.tasks.metrics import accuracy
from clipzoo.tasks.validation import DEFAULT_FRACTION, DEFAULT_SEED, validation_split
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
        t_frozen, t_path = alternating([frozen, path], repeats)
    return statistics.median(t_path), statistics.median(t_frozen)


def run_domain(bb, task: TaskData, methods: list[str], s: TrainSettings, fixed: dict, repeats: int,
               batch: int, echo=print, val_fraction: float = DEFAULT_FRACTION,
               lrs: list[float] | None = None) -> list[dict]:
    """One row per (method, LR): trained on the training split less the carved validation split."""
    train_task, val_task = validation_split(task, val_fraction, DEFAULT_SEED)
    tr, va, te = train_task.train, val_task.test, task.test
    if not len(va):
        raise ConfigError(f"{task.name}: no validation images (a class needs 2 training images to give one)")
    px_tr, px_va, px_te = _pixels(bb, tr.images), _pixels(bb, va.images), _pixels(bb, te.images)
    y_tr, y_va, y_te = torch.tensor(tr.labels), torch.tensor(va.labels), torch.tensor(te.labels)
    x_tr, x_va, x_te = (_batched(bb.encode_images, px) for px in (px_tr, px_va, px_te))
    px_lat = px_te[:batch]
    w = bb.class_embeddings(task.classes, task.templates)
    sizes = {"n_train": len(tr), "n_val": len(va), "n_test": len(te)}

    def zero_shot(f: torch.Tensor) -> torch.Tensor:
        return bb.logit_scale * f @ w.T

    def frozen() -> torch.Tensor:
        return zero_shot(bb.encode_images(px_lat))

    t_path, t_frozen = _latency(frozen, frozen, repeats)
    rows = [{"domain": task.name, "method": "zero-shot", "val_acc": accuracy(_batched(zero_shot, x_va).argmax(1), y_va),
             "test_acc": accuracy(_batched(zero_shot, x_te).argmax(1), y_te), "trainable_params": 0,
             "trainable_share": 0.0, "epochs": 0, "lr": 0.0, "is_default_lr": None, "train_seconds": 0.0,
             "ms_per_image": 1000 * t_path / len(px_lat), "overhead": t_path / t_frozen - 1, **sizes}]
    echo(_row(rows[-1]))
    for kind in methods:
        defaults = train_defaults(kind)
        for lr in lrs or [None]:
            sk = replace(s, **{**defaults, **fixed, **({"lr": lr} if lr is not None else {})})
            torch.manual_seed(sk.seed)
            exp = build_expert(kind, bb, task.classes, task.templates)
            inputs = (x_tr, px_tr) if exp.needs_pixels else (x_tr,)
            hist = fit(exp, inputs, y_tr, sk, criterion=exp.criterion)
            exp.eval()
            accs = {f"{split}_acc": accuracy(_batched(exp, x, px).argmax(1), y)
                    for split, x, px, y in (("val", x_va, px_va, y_va), ("test", x_te, px_te, y_te))}
            t_path, t_frozen = _latency(lambda: exp(bb.encode_images(px_lat), px_lat), frozen, repeats)
            n = exp.trainable_params()
            rows.append({"domain": task.name, "method": kind, **accs, "trainable_params": n,
                         "trainable_share": n / bb.num_params, "epochs": sk.epochs, "lr": sk.lr,
                         "is_default_lr": sk.lr == defaults["lr"], "train_seconds": hist["train_seconds"],
                         "ms_per_image": 1000 * t_path / len(px_lat), "overhead": t_path / t_frozen - 1, **sizes})
            echo(_row(rows[-1]))
    return rows


def choose_lrs(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per (domain, kind) of ``rows``, the LR with the best validation accuracy (ties: the kind's
    default, then the first run); its test accuracy is reported, never used to choose."""
    out = []
    for dom in dict.fromkeys(r["domain"] for r in rows):
        for kind in methods:
            runs = [r for r in rows if r["domain"] == dom and r["method"] == kind]
            best = max(runs, key=lambda r: (r["val_acc"], r["is_default_lr"]))  # max keeps the first on a tie
            out.append({"domain": dom, "method": kind, "default_lr": train_defaults(kind)["lr"],
                        "val_acc": {f"{r['lr']:g}": r["val_acc"] for r in runs},
                        "test_acc": {f"{r['lr']:g}": r["test_acc"] for r in runs},
                        "chosen_on_validation": best["lr"], "chosen_is_default": best["is_default_lr"],
                        "chosen_val_acc": best["val_acc"], "chosen_test_acc": best["test_acc"]})
    return out


HEADER = ("| domain | method | val acc | test acc | trainable params | share of backbone | epochs | lr | train s "
          "| ms/img | overhead vs frozen |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['domain']} | {r['method']} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_share']:.2f}% | {r['epochs']} | {r['lr']:g} | {r['train_seconds']:.1f} | "
            f"{r['ms_per_image']:.3f} | {100 * r['overhead']:+.0f}% |")


def _choice_line(c: dict) -> str:
    return (f"- {c['domain']} / {c['method']}: lr {c['chosen_on_validation']:g} chosen on validation "
            f"(val {c['chosen_val_acc']:.3f}, test {c['chosen_test_acc']:.3f}); default {c['default_lr']:g} "
            f"{'is' if c['chosen_is_default'] else 'is not'} the choice")


def markdown(rows: list[dict], choices: list[dict] | None = None) -> str:
    lines = [HEADER] + [_row(r) for r in rows]
    if choices:
        lines += ["", "LR chosen on validation (test accuracy only reported):", ""] + [_choice_line(c) for c in choices]
    return "\n".join(lines)


def _good_lrs(lrs: list[float]) -> bool:
    return bool(lrs) and all(math.isfinite(v) and v > 0 for v in lrs) and len(set(lrs)) == len(lrs)


def parse_lrs(text: str | None) -> list[float] | None:
    """``--lrs``: comma-separated distinct positive finite LRs (None stays None)."""
    if text is None:
        return None
    try:
        lrs = [float(v) for v in text.split(",")]
    except ValueError:
        lrs = []
    if not _good_lrs(lrs):
        raise ConfigError(f"bad --lrs {text!r}: use distinct positive numbers, e.g. 1e-3,3e-3,1e-2")
    return lrs


def run_kinds_bench(domains: list[str | TaskData], methods: list[str] = METHODS, epochs: int | None = None,
                    lr: float | None = None, seed: int = 0, repeats: int = 7, batch: int = 128,
                    backbone: BackboneSpec = BackboneSpec(), out: Path | None = None, echo=print,
                    val_fraction: float = DEFAULT_FRACTION, lrs: list[float] | None = None) -> dict:
    """Every method on every domain (DIRs, ``builtin:<domain>`` or loaded tasks), trained on the
    training split less a ``val_fraction`` validation split; writes kinds.json/kinds.md to ``out``."""
    for m in methods:
        parse_kinds(m)  # an unknown kind fails before any work
    if lrs is not None and lr is not None:
        raise ConfigError("give --lr (one LR for every kind) or --lrs (a grid chosen on validation), not both")
    if lrs is not None and not _good_lrs(list(lrs)):
        raise ConfigError(f"bad --lrs {lrs}: use distinct positive numbers, e.g. 1e-3,3e-3,1e-2")
    tasks = [d if isinstance(d, TaskData) else load_task(d) for d in domains]  # bad data fails before any work
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction}")
    bb = load_backbone(backbone)
    s = TrainSettings(seed=seed)
    fixed = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    echo(HEADER)
    rows = []
    for task in tasks:
        rows += run_domain(bb, task, methods, s, fixed, repeats, batch, echo, val_fraction, lrs)
    res = {"backbone": str(bb.spec), "backbone_params": bb.num_params, "train": {**s.to_dict(), **fixed},
           "validation": {"fraction": val_fraction, "seed": DEFAULT_SEED,
                          "split": "carved per class from each training split; methods train on the rest"},
           "latency": {"batch": batch, "repeats": repeats}, "machine": machine_info(),
           "task_ids": "given (oracle)", "rows": rows}
    choices = None
    if lrs is not None:
        choices = choose_lrs(rows, methods)
        res["train"]["lrs"] = list(lrs)
        res["lr_choice"] = {"criterion": "validation", "per_domain_kind": choices}
        echo("\n".join([""] + [_choice_line(c) for c in choices]))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kinds.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "kinds.md").write_text(markdown(rows, choices) + "\n")
    return res
