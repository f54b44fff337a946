"""The fusion benchmark (``clipzoo bench-fusion``): does combining experts help?

A validation split is carved from each domain's training split
(:func:`clipzoo.tasks.validation.validation_split`, ``--val-fraction`` of each class, validation seed
``DEFAULT_SEED``); the domain experts, the router and the zoo-wide fusion learn from the rest only.

1. A zoo of clip-adapter experts over the given domains. Task-agnostic accuracy on the pooled
   validation sets and on the pooled test sets (no task ids: an answer counts only with the right
   task and the right class) for the three prediction modes at ``--top-k``: router top-1, uniform
   average of the top-k, and top-k AdapterFusion; the oracle (task id given) beside them. The
   setting a user should pick (``chosen_on_validation``: mode and top-k) is the routed one best on
   validation (mean over seeds); test accuracy only reports.
2. A new task learned few-shot (k images per class, and all): a fusion expert composed from the
   domain experts (``--kind fusion``) versus a fresh clip-adapter expert, same images, epochs,
   learning rate and seed; test accuracy with the task id given.
3. ``fusion_weights.png``: the mean fusion weight per (true task, expert), and per source of each
   composed expert on the new task's test images (means over seeds).

Every expert is seeded: ``torch.manual_seed(seed)`` before it is built and trained, and
``TrainSettings.seed``; the zoo-wide fusion and the few-shot draws use the same seed. ``--seeds N``
repeats the whole run with seeds SEED..SEED+N-1: ``per_seed`` keeps each run, ``summary`` gives the
mean and std of every figure. ``add_seconds`` is the expert's training and commit (the zoo-wide
fusion is not retrained ahead at each add here; its training is timed on its own).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from clipzoo.bench.harness import machine_info
from clipzoo.errors import ConfigError
from clipzoo.router.fusion import MODES
from clipzoo.tasks.metrics import accuracy
from clipzoo.tasks.spec import Split, TaskData
from clipzoo.tasks.validation import DEFAULT_FRACTION, DEFAULT_SEED, validation_split
from clipzoo.zoo.experts.fusion import BASE, FusionExpert
from clipzoo.zoo.train import TrainSettings, fit
from clipzoo.zoo.zoo import Zoo

LABELS = ("shots",)  # numbers kept as in the first run, never averaged


@dataclass
class FusionBenchSettings:
    top_k: int = 2
    shots: list[int | None] = field(default_factory=lambda: [4, 16, None])  # None: every training image
    seed: int = 0   # first seed; runs use seed, seed+1, ..., seed+seeds-1
    seeds: int = 1
    epochs: int = 20
    lr: float = 2e-3
    val_fraction: float = DEFAULT_FRACTION

    def train(self, seed: int | None = None) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, lr=self.lr, seed=self.seed if seed is None else seed)


def few_shot(task: TaskData, shots: int | None, seed: int, name: str) -> TaskData:
    """``shots`` training images per class (drawn with ``seed``), the full test split."""
    idx = list(range(len(task.train)))
    if shots is not None:
        rng = random.Random(seed)
        by_class: dict[int, list[int]] = {}
        for i in idx:
            by_class.setdefault(task.train.labels[i], []).append(i)
        idx = sorted(i for c in sorted(by_class) for i in rng.sample(by_class[c], min(shots, len(by_class[c]))))
    train = Split([task.train.images[i] for i in idx], [task.train.labels[i] for i in idx])
    return TaskData(name, task.classes, train, task.test, task.templates, task.source)


def _mode_table(zoo: Zoo, tasks: list[TaskData], feats: list[torch.Tensor], k: int) -> tuple[dict, list[list[float]]]:
    """Per mode, accuracy on the ``test`` splits of ``tasks`` (features ``feats``), task ids not given
    but for the oracle; and the mean fusion weight per (task, expert)."""
    rows, names = {}, zoo.names
    weights = [[0.0] * len(names) for _ in tasks]
    for mode in ("oracle",) + MODES:
        t0 = time.perf_counter()
        per_task, right_task, n_ok, n = {}, 0, 0, 0
        for j, (t, x) in enumerate(zip(tasks, feats)):
            preds = (zoo.predict_features(x, task=t.name) if mode == "oracle"
                     else zoo.predict_features(x, top_k=k, mode=mode))
            ok = [p["task"] == t.name and p["label"] == t.classes[y] for p, y in zip(preds, t.test.labels)]
            per_task[t.name] = round(sum(ok) / len(ok), 6)
            right_task += sum(p["task"] == t.name for p in preds)
            n_ok, n = n_ok + sum(ok), n + len(ok)
            if mode == "fusion":
                for p in preds:
                    for e, w in p["fusion"].items():
                        weights[j][names.index(e)] += w / len(preds)
        rows[mode] = {"accuracy": round(n_ok / n, 6), "task_accuracy": round(right_task / n, 6), "per_task": per_task,
                      "task_ids": "given" if mode == "oracle" else "routed",
                      "ms_per_image": round(1000 * (time.perf_counter() - t0) / n, 4)}
    return rows, [[round(w, 6) for w in row] for row in weights]


def _no_source_ablation(zoo: Zoo, td: TaskData, x_test: torch.Tensor, s: FusionBenchSettings, seed: int) -> float:
    """The same fusion layer and head over the frozen feature alone (no experts): how much of a
    composed expert's accuracy its sources bring."""
    bb = zoo.backbone
    torch.manual_seed(seed)
    exp = FusionExpert({}, td.classes, td.templates, bb.class_embeddings(td.classes, td.templates), bb.logit_scale,
                       bb.fingerprint, include_base=True, seed=seed)
    fit(exp, (zoo.features(td.train.images),), torch.tensor(td.train.labels), s.train(seed))
    with torch.no_grad():
        return round(accuracy(exp(x_test).argmax(1), torch.tensor(td.test.labels)), 6)


def _add(zoo: Zoo, td: TaskData, s: FusionBenchSettings, seed: int, **kw) -> dict:
    """``zoo.add_task`` with the global RNG seeded before the expert is built and trained."""
    torch.manual_seed(seed)
    return zoo.add_task(td, train=s.train(seed), **kw)


def run_seed(tasks: list[TaskData], new_task: TaskData, s: FusionBenchSettings, seed: int, zoo_dir: Path) -> dict:
    """One whole run with every expert, the zoo-wide fusion and the few-shot draws seeded by ``seed``;
    ``tasks`` are the domains with their validation splits still in the training split."""
    t_start = time.perf_counter()
    if zoo_dir.exists():
        shutil.rmtree(zoo_dir)
    zoo = Zoo.create(zoo_dir)
    zoo.fusion_settings = replace(zoo.fusion_settings, seed=seed)
    zoo.fusion_at_add = False  # the zoo-wide fusion is trained (and timed) once below, not ahead at each add
    parts = [validation_split(t, s.val_fraction, DEFAULT_SEED) for t in tasks]
    for tr, _ in parts:
        _add(zoo, tr, s, seed)
    domains = zoo.names
    t0 = time.perf_counter()
    zoo.global_fusion(s.top_k)
    fusion_seconds = time.perf_counter() - t0
    tables = {split: _mode_table(zoo, evals, [zoo.features(t.test.images, f"encode {t.name}/{split}") for t in evals],
                                 s.top_k) for split, evals in (("val", [va for _, va in parts]), ("test", tasks))}
    modes, weights = {split: t[0] for split, t in tables.items()}, tables["test"][1]

    few, source_weights = [], {}
    x_new = zoo.features(new_task.test.images, f"encode {new_task.name}/test")
    for shots in s.shots:
        tag = f"{shots}shot" if shots is not None else "all"
        row: dict = {"shots": shots if shots is not None else "all"}
        for kind in ("fusion", "clip-adapter"):
            td = few_shot(new_task, shots, seed, f"{new_task.name}-{tag}-{kind}")
            rec = _add(zoo, td, s, seed, kind=kind, sources=domains if kind == "fusion" else None)
            row[kind] = {"test_acc": rec["metrics"]["test_acc"], "trainable_params": rec["trainable_params"],
                         "add_seconds": rec["metrics"]["add_seconds"], "n_train": len(td.train)}
            row["zero_shot_acc"] = rec["metrics"]["zero_shot_acc"]
            if kind == "fusion":
                ws = zoo.expert(td.name).fusion_weights(x_new)
                source_weights[tag] = {c: round(sum(w[c] for w in ws) / len(ws), 6) for c in ws[0]}
        row["no-source ablation"] = {"test_acc": _no_source_ablation(zoo, td, x_new, s, seed)}
        few.append(row)
    return {"seed": seed, "task_agnostic": modes, "chosen_on_validation": _choose(modes["val"], s.top_k),
            "fusion_weights": weights, "few_shot": few, "composed_source_weights": source_weights,
            "timing": {"global_fusion_train_seconds": round(fusion_seconds, 3),
                       "total_seconds": round(time.perf_counter() - t_start, 3)},
            "global_fusion": zoo.fusion_info, "experts": domains,
            "backbone": zoo.registry["backbone"]["model"]}


def _choose(val_modes: dict, k: int) -> dict:
    """The routed setting (mode at top-k) with the best validation accuracy; the first on a tie."""
    acc = {m: r["accuracy"]["mean"] if isinstance(r["accuracy"], dict) else r["accuracy"]
           for m, r in val_modes.items() if r["task_ids"] == "routed"}
    best = max(acc, key=acc.get)
    return {"mode": best, "top_k": 1 if best == "top1" else k, "val_accuracy": acc[best]}


def _ms(vals: list[float]) -> dict:
    return {"mean": round(statistics.mean(vals), 6), "std": round(statistics.stdev(vals), 6) if len(vals) > 1 else 0.0}


def _summarise(runs: list) -> object:
    """Mean and std over seeds of every number in ``runs`` (records of the same shape); the rest as
    in the first run (labels, or few-shot rows matched by position)."""
    first = runs[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict, list)):
        return first
    if isinstance(first, (int, float)):
        return _ms([float(r) for r in runs])
    if isinstance(first, list):
        return [_summarise([r[i] for r in runs]) for i in range(len(first))]
    return {key: first[key] if key in LABELS else _summarise([r[key] for r in runs]) for key in first}


def _mean_matrix(ms: list[list[list[float]]]) -> list[list[float]]:
    return [[round(statistics.mean(m[i][j] for m in ms), 6) for j in range(len(ms[0][i]))] for i in range(len(ms[0]))]


def run_fusion_bench(tasks: list[TaskData], new_task: TaskData, s: FusionBenchSettings = FusionBenchSettings(),
                     out: Path | None = None) -> dict:
    """Run both comparisons for each seed; write ``report.json``, ``report.md`` and
    ``fusion_weights.png`` under ``out`` (the last seed's zoo stays in ``out/zoo``)."""
    if s.seeds < 1 or not 0.0 < s.val_fraction < 1.0:
        raise ConfigError(f"bench-fusion needs seeds >= 1 and a validation fraction in (0, 1), got {s.seeds}, "
                          f"{s.val_fraction}")
    t_start = time.perf_counter()
    scratch = None if out else Path(tempfile.mkdtemp(prefix="clipzoo-fusion-bench-"))
    try:
        runs = [run_seed(tasks, new_task, s, seed, (out or scratch) / "zoo")
                for seed in range(s.seed, s.seed + s.seeds)]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {key: _summarise([r[key] for r in runs]) for key in ("task_agnostic", "few_shot")}
    chosen = _choose(summary["task_agnostic"]["val"], s.top_k)
    chosen["test_accuracy"] = summary["task_agnostic"]["test"][chosen["mode"]]["accuracy"]["mean"]
    names = [t.name for t in tasks]
    tags = list(runs[0]["composed_source_weights"])
    cols = list(runs[0]["composed_source_weights"][tags[0]]) if tags else []
    comp = (_mean_matrix([[[r["composed_source_weights"][t][c] for c in cols] for t in tags] for r in runs])
            if tags else [])
    result = {
        "domains": names, "new_task": new_task.name, "settings": asdict(s), "seeds": [r["seed"] for r in runs],
        "validation": {"fraction": s.val_fraction, "seed": DEFAULT_SEED,
                       "n_val": {t.name: len(validation_split(t, s.val_fraction, DEFAULT_SEED)[1].test) for t in tasks},
                       "split": "carved per class from each domain's training split; the zoo learns from the rest"},
        "choice": {"criterion": "validation", "candidates": [{"mode": m, "top_k": 1 if m == "top1" else s.top_k}
                                                             for m in MODES],
                   "chosen_on_validation": chosen, "per_seed": [r["chosen_on_validation"] for r in runs]},
        "summary": summary,
        "fusion_weights": {"tasks": names, "experts": runs[0]["experts"],
                           "mean": _mean_matrix([r["fusion_weights"] for r in runs])},
        "composed_source_weights": {t: dict(zip(cols, row)) for t, row in zip(tags, comp)},
        "per_seed": runs,
        "timing": {"total_seconds": round(time.perf_counter() - t_start, 3)},
        "backbone": runs[0]["backbone"],
        "machine": machine_info(),
    }
    if out:
        write_fusion_report(result, out)
    return result


def _f(v: dict, n: int, digits: int = 3) -> str:
    """A summarised figure: the mean, with the std over seeds when there are several."""
    return f"{v['mean']:.{digits}f}" + (f" ± {v['std']:.{digits}f}" if n > 1 else "")


def markdown_tables(res: dict) -> str:
    """Table 1: modes x (validation, test, per-task test) task-agnostic accuracy, and the setting
    chosen on validation; table 2: few-shot composition. Means (± std) over the seeds."""
    doms, k, n = res["domains"], res["settings"]["top_k"], len(res["seeds"])
    sm = res["summary"]["task_agnostic"]
    label = {"oracle": "oracle (task id given)", "top1": "router top-1", "avg": f"top-{k} uniform average",
             "fusion": f"top-{k} AdapterFusion"}
    lines = [f"Seeds {', '.join(map(str, res['seeds']))}; validation: {res['validation']['fraction']:g} of each "
             "training split (the choice); test: report only.", "",
             "| mode | task ids | val accuracy | test accuracy | task chosen right (test) | "
             + " | ".join(doms) + " | ms/image |", "|" + "---|" * (len(doms) + 6)]
    for mode, r in sm["test"].items():
        lines.append(f"| {label[mode]} | {r['task_ids']} | {_f(sm['val'][mode]['accuracy'], n)} | "
                     f"{_f(r['accuracy'], n)} | {_f(r['task_accuracy'], n)} | " + " | ".join(_f(r['per_task'][d], n) for d in doms)
                     + f" | {r['ms_per_image']['mean']:.3f} |")
    c = res["choice"]["chosen_on_validation"]
    lines += ["", f"Chosen on {res['choice']['criterion']}: {label[c['mode']]} (val {c['val_accuracy']:.3f}, "
              f"test {c['test_accuracy']:.3f}).",
              "", f"New task {res['new_task']} (task id given; zero-shot CLIP for reference):", "",
              "| shots/class | fusion-composed | fresh clip-adapter | fusion, no sources (ablation) | zero-shot | "
              "fusion params | adapter params |", "|---|---|---|---|---|---|---|"]
    for r in res["summary"]["few_shot"]:
        lines.append(f"| {r['shots']} | {_f(r['fusion']['test_acc'], n)} | {_f(r['clip-adapter']['test_acc'], n)} | "
                     f"{_f(r['no-source ablation']['test_acc'], n)} | {_f(r['zero_shot_acc'], n)} | "
                     f"{int(r['fusion']['trainable_params']['mean']):,} | "
                     f"{int(r['clip-adapter']['trainable_params']['mean']):,} |")
    return "\n".join(lines)


def plot_fusion_weights(res: dict, path: Path) -> None:
    """Heatmaps of the mean fusion weight per (true task, expert) and per composed source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fw, sw = res["fusion_weights"], res["composed_source_weights"]
    cols = fw["experts"] + [BASE]
    comp = [[row.get(c, 0.0) for c in cols] for row in sw.values()]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.1 * len(cols), 1.5 + 0.5 * len(fw["tasks"])),
                             gridspec_kw={"width_ratios": [len(fw["experts"]), len(cols)]})
    panels = [(fw["mean"], fw["tasks"], fw["experts"], f"top-{res['settings']['top_k']} fusion weight"),
              (comp, [f"{res['new_task']} {t}" for t in sw], cols, "composed expert: source weight")]
    for ax, (m, rows, xs, title) in zip(axes, panels):
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(title, fontsize=9)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
    axes[0].set_ylabel("true task")
    axes[0].set_xlabel("expert")
    axes[1].set_xlabel("source")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_fusion_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(res, indent=2) + "\n")
    plot_fusion_weights(res, out / "fusion_weights.png")
    (out / "report.md").write_text(f"# Fusion benchmark\n\n{markdown_tables(res)}\n\n![fusion weights](fusion_weights.png)\n")
