"""The fusion benchmark (``clipzoo bench-fusion``): does combining experts help?

1. A zoo of clip-adapter experts over the given domains. Task-agnostic accuracy on the pooled test
   sets (no task ids: an answer counts only with the right task and the right class) for the three
   prediction modes: router top-1, uniform average of the top-k, and top-k AdapterFusion; the
   oracle (task id given) beside them.
2. A new task learned few-shot (k images per class, and all): a fusion expert composed from the
   domain experts (``--kind fusion``) versus a fresh clip-adapter expert, same images, epochs,
   learning rate and seed; test accuracy with the task id given.
3. ``fusion_weights.png``: the mean fusion weight per (true task, expert), and per source of each
   composed expert on the new task's test images.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipzoo.bench.harness import machine_info
from clipzoo.router.fusion import MODES
from clipzoo.tasks.metrics import accuracy
from clipzoo.tasks.spec import Split, TaskData
from clipzoo.zoo.experts.fusion import BASE, FusionExpert
from clipzoo.zoo.train import TrainSettings, fit
from clipzoo.zoo.zoo import Zoo


@dataclass
class FusionBenchSettings:
    top_k: int = 2
    shots: list[int | None] = field(default_factory=lambda: [4, 16, None])  # None: every training image
    seed: int = 0
    epochs: int = 20
    lr: float = 2e-3

    def train(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, lr=self.lr, seed=self.seed)


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


def _no_source_ablation(zoo: Zoo, td: TaskData, x_test: torch.Tensor, s: FusionBenchSettings) -> float:
    """The same fusion layer and head over the frozen feature alone (no experts): how much of a
    composed expert's accuracy its sources bring."""
    bb = zoo.backbone
    exp = FusionExpert({}, td.classes, td.templates, bb.class_embeddings(td.classes, td.templates), bb.logit_scale,
                       bb.fingerprint, include_base=True, seed=s.seed)
    fit(exp, (zoo.features(td.train.images),), torch.tensor(td.train.labels), s.train())
    with torch.no_grad():
        return round(accuracy(exp(x_test).argmax(1), torch.tensor(td.test.labels)), 6)


def run_fusion_bench(tasks: list[TaskData], new_task: TaskData, s: FusionBenchSettings = FusionBenchSettings(),
                     out: Path | None = None) -> dict:
    """Run both comparisons; write ``report.json``, ``report.md`` and ``fusion_weights.png`` under ``out``."""
    t_start = time.perf_counter()
    zoo_dir = (out or Path(".")) / "zoo"
    if zoo_dir.exists():
        shutil.rmtree(zoo_dir)
    zoo = Zoo.create(zoo_dir)
    for t in tasks:
        zoo.add_task(t, train=s.train())
    domains = zoo.names
    feats = [zoo.features(t.test.images, f"encode {t.name}/test") for t in tasks]
    t0 = time.perf_counter()
    zoo.global_fusion(s.top_k)
    fusion_seconds = time.perf_counter() - t0
    modes, weights = _mode_table(zoo, tasks, feats, s.top_k)

    few, source_weights = [], {}
    x_new = zoo.features(new_task.test.images, f"encode {new_task.name}/test")
    for shots in s.shots:
        tag = f"{shots}shot" if shots is not None else "all"
        row = {"shots": shots if shots is not None else "all"}
        for kind in ("fusion", "clip-adapter"):
            td = few_shot(new_task, shots, s.seed, f"{new_task.name}-{tag}-{kind}")
            rec = zoo.add_task(td, kind=kind, train=s.train(),
                               sources=domains if kind == "fusion" else None)
            row[kind] = {"test_acc": rec["metrics"]["test_acc"], "trainable_params": rec["trainable_params"],
                         "add_seconds": rec["metrics"]["add_seconds"], "n_train": len(td.train)}
            row["zero_shot_acc"] = rec["metrics"]["zero_shot_acc"]
            if kind == "fusion":
                ws = zoo.expert(td.name).fusion_weights(x_new)
                source_weights[tag] = {c: round(sum(w[c] for w in ws) / len(ws), 6) for c in ws[0]}
        row["no-source ablation"] = {"test_acc": _no_source_ablation(zoo, td, x_new, s)}
        few.append(row)

    result = {
        "domains": domains, "new_task": new_task.name, "settings": asdict(s),
        "task_agnostic": modes, "fusion_weights": {"tasks": domains, "experts": domains, "mean": weights},
        "few_shot": few, "composed_source_weights": source_weights,
        "timing": {"global_fusion_train_seconds": round(fusion_seconds, 3),
                   "total_seconds": round(time.perf_counter() - t_start, 3)},
        "global_fusion": zoo.fusion_info,
        "backbone": zoo.registry["backbone"]["model"], "machine": machine_info(),
    }
    if out:
        write_fusion_report(result, out)
    return result


def markdown_tables(res: dict) -> str:
    """Table 1: modes x (pooled, per-task) task-agnostic accuracy; table 2: few-shot composition."""
    doms, k = res["domains"], res["settings"]["top_k"]
    label = {"oracle": "oracle (task id given)", "top1": "router top-1", "avg": f"top-{k} uniform average",
             "fusion": f"top-{k} AdapterFusion"}
    lines = ["| mode | task ids | accuracy | task chosen right | " + " | ".join(doms) + " | ms/image |",
             "|" + "---|" * (len(doms) + 5)]
    for mode, r in res["task_agnostic"].items():
        lines.append(f"| {label[mode]} | {r['task_ids']} | {r['accuracy']:.3f} | {r['task_accuracy']:.3f} | "
                     + " | ".join(f"{r['per_task'][d]:.3f}" for d in doms) + f" | {r['ms_per_image']:.3f} |")
    lines += ["", f"New task {res['new_task']} (task id given; zero-shot CLIP for reference):", "",
              "| shots/class | fusion-composed | fresh clip-adapter | fusion, no sources (ablation) | zero-shot | "
              "fusion params | adapter params |", "|---|---|---|---|---|---|---|"]
    for r in res["few_shot"]:
        lines.append(f"| {r['shots']} | {r['fusion']['test_acc']:.3f} | {r['clip-adapter']['test_acc']:.3f} | "
                     f"{r['no-source ablation']['test_acc']:.3f} | {r['zero_shot_acc']:.3f} | "
                     f"{r['fusion']['trainable_params']:,} | "
                     f"{r['clip-adapter']['trainable_params']:,} |")
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
