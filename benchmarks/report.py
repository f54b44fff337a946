"""Benchmark reports: ``report.json``, ``report.md`` (summary table), accuracy-matrix heatmaps
(``acc_matrix.png``, one panel per method) and accuracy-over-steps curves (``acc_curves.png``)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from clipzoo.tasks.metrics import METRIC_KEYS, SOURCES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = list(METRIC_KEYS)
ACC = COLUMNS[:COLUMNS.index("trainable_params")]  # the accuracy columns; the rest are costs
HEAD = {"avg_mtil": "avg (MTIL)", "avg_inc": "avg inc", "task_agnostic_acc": "task-agnostic", "oracle_acc": "task ids given", "routing_accuracy": "routing",
        "trainable_params": "trainable params", "stored_params": "stored params", "train_seconds": "train s",
        "infer_ms_per_image": "infer ms/img"}
LABEL = {"zoo": "zoo (routed)", "zoo-oracle": "zoo, oracle task ids (routing upper bound)",
         "adapter-joint": "adapter-joint (shared adapter retrained on all seen data)"}
DEFINED = {"avg_mtil": "mean of all T x T cells of R", "avg_inc": "mean over steps of the seen-task mean",
           "last": "mean of R's last row", "forgetting": "mean drop from each task's best earlier accuracy",
           "bwt": "mean of R[T-1][j] - R[j][j]", "transfer": "mean of the upper triangle per task (unseen tasks)"}


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    if key.endswith("_params"):
        return f"{int(v):,}"
    return f"{v:.2f}" if key == "train_seconds" else f"{v:.3f}" if key != "infer_ms_per_image" else f"{v:.4f}"


def _label(name: str, m: dict) -> str:
    return LABEL.get(name, f"{name} (cross-check)" if m.get("cross_check") else name)


def _methods(res: dict) -> dict[str, dict]:
    return {"zoo": res["metrics"], **res["baselines"]}


def markdown_table(res: dict) -> str:
    """One row per method; with several runs each cell is mean ± std over orders and seeds."""
    agg = res.get("aggregate", {})
    several = len(res.get("runs", [])) > 1
    head = "| method | task ids | " + " | ".join(HEAD.get(c, c) for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, m in _methods(res).items():
        cells = []
        for c in COLUMNS:
            a = agg.get(name, {}).get(c)
            if several and a and a["mean"] is not None:
                cells.append(f"{_fmt(a['mean'], c)} ± {_fmt(a['std'], c)}" if c in ACC else _fmt(a["mean"], c))
            else:
                cells.append(_fmt(m.get(c), c))
        lines.append(f"| {_label(name, m)} | {'yes' if m.get('uses_task_ids') else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _matrix_md(tasks: list[str], R: list[list[float]]) -> str:
    head = "| after \\ on | " + " | ".join(tasks) + " |"
    sep = "|" + "---|" * (len(tasks) + 1)
    return "\n".join([head, sep] + [f"| {tasks[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                                    for i, row in enumerate(R)])


def heatmaps(res: dict, path: Path) -> Path:
    """One heatmap per method of R[i][j] (rows: after training task i; columns: evaluated on task j)."""
    mats = {_label(n, m): m.get("acc_matrix", res["acc_matrix"]) for n, m in _methods(res).items()}
    tasks = res["tasks"]
    cols = min(4, len(mats))
    rows = (len(mats) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(mats):]:
        ax.axis("off")
    for ax, (name, R) in zip(axes.flat, mats.items()):
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w" if v < 0.6 else "k")
    fig.suptitle("accuracy matrix R[i][j]: row = after training task i, column = task j "
                 "(upper triangle: zero-shot transfer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(res: dict, path: Path) -> Path:
    """Mean accuracy over the tasks seen so far after each step, one line per method."""
    tasks = res["tasks"]
    lines = {n: m for n, m in _methods(res).items() if m.get("seen_acc_per_step")}
    colours = plt.get_cmap("tab20")(range(20))
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for k, (name, m) in enumerate(lines.items()):
        ys = m["seen_acc_per_step"]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=_label(name, m),
                color=colours[(2 * k) % 20 + k // 10], linestyle="--" if m.get("cross_check") else "-")
    top = max((v for m in lines.values() for v in m["seen_acc_per_step"]), default=1.0)
    ax.set_xticks(range(1, len(tasks) + 1), [f"{i + 1}\n{t}" for i, t in enumerate(tasks)], fontsize=7)
    ax.set_xlabel("after training step")
    ax.set_ylabel("mean accuracy on seen tasks")
    ax.set_ylim(0, min(1.0, top + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ood_md(ood: dict) -> str:
    if not ood.get("holdout"):
        return "OOD: no held-out domain given."
    if not ood["available"]:
        return f"OOD ({ood['holdout']}, held out): not available: {ood['reason']}."
    return (f"OOD ({ood['holdout']}, held out, {ood['n']} images): fallback rate {ood['fallback_rate']:.3f}; "
            f"false-fallback rate on the known domains {ood['false_fallback_rate']:.3f}.")


def metrics_md() -> str:
    """One line per matrix metric: its definition and source."""
    return "Metrics (formulas in `tasks/metrics.py`): " + "; ".join(
        f"{HEAD.get(k, k)} (`{k}`) = {DEFINED[k]} [{SOURCES[k]}]" for k in DEFINED) + "."


def tuning_md(s: dict) -> str:
    """The baselines' hyper-parameters and how they were chosen."""
    t = s.get("tuning") or {}
    if not t.get("tuned"):
        return (f"Baseline hyper-parameters as given (not tuned): EWC lambda {s.get('ewc_lambda')}, LwF alpha "
                f"{s.get('lwf_alpha')}, adapter-ZSCL beta {s.get('zscl_beta')}, SLDA shrinkage {s.get('slda_shrinkage')}, "
                f"fine-tuning lr {s.get('ft_lr')}, ft-zscl weight {s.get('ft_zscl_weight')}, clip-cite weight "
                f"{s.get('ft_cite_weight')}.")
    sizes = ", ".join(f"{n} {a}/{b}" for n, (a, b) in zip(t["on"], t["val_sizes"]))
    rows = "; ".join(f"{k} = {t['chosen'][k]:g} from {{{', '.join(f'{v:g}' for v in t['grids'][k])}}} "
                     f"(validation acc {', '.join(f'{a:.3f}' for a in t['scores'][k])})" for k in t["chosen"])
    return (f"Baseline hyper-parameters chosen on validation data ({t['criterion']}; {t['fraction']:.0%} of each "
            f"training split per class, seed {t['val_seed']}; train/validation images: {sizes}; "
            f"{t['seconds']:.1f}s): {rows or 'none of the tuned methods ran'}. "
            "Every method then trains on the full training splits; test splits only report.")


def write_report(res: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(res, indent=2) + "\n")
    heat = heatmaps(res, out / "acc_matrix.png")
    curve = curves(res, out / "acc_curves.png")
    s, m = res["settings"], res["machine"]
    runs = res.get("runs", [])
    md = [
        "# clipzoo forgetting benchmark", "",
        f"Tasks: {', '.join(res['tasks'])}. Backbone: {s['backbone']} ({s['pretrained']}), "
        f"{s['backbone_params']:,} frozen parameters. Expert kind: {s['kind']}; epochs {s['epochs']}, "
        f"lr {s['lr']}, batch {s['batch_size']}; router: {s['router']}. The zoo and the adapter-* baselines train on "
        "the same cached features with the same epochs, learning rate, batch size and seed; the full-fine-tuning "
        f"baselines (ft-*, clip-cite) train the backbone's towers on the same images as pixels, "
        f"{s.get('ft_steps')} minibatches of {s.get('ft_batch_size')} per task at lr {s.get('ft_lr')}, same seed. "
        "Task ids at test time: no, except rows marked 'yes'. Accuracies are fractions in 0..1.",
        "The adapter-* baselines share one CLIP-Adapter with text-initialised heads "
        f"(head lr x{s.get('baseline_head_lr_scale', 1)}); ft-naive fine-tunes the image tower, ft-zscl and "
        "clip-cite both towers (classifier: class-name text embeddings); slda is training-free (class Gaussians "
        "from per-task statistics); rows marked cross-check are avalanche-lib's own strategies on the same model "
        "and features. Above the diagonal every method is given the unseen task's class names (the fine-tuning "
        "baselines score them through their fine-tuned towers). The zoo answers them through its real path: routed "
        "like any input, an image counts only if the router falls back and zero-shot CLIP over the given names is "
        "right; the oracle zoo knows the task is new and answers zero-shot, as does slda (no statistics yet).",
        tuning_md(s), metrics_md(),
        f"Runs: {len(runs)} ({s.get('n_orders', 1)} order(s) x {s.get('n_seeds', 1)} seed(s)); "
        + ("cells are mean ± std over the runs (costs: mean)." if len(runs) > 1 else "one run."), "",
        markdown_table(res), "",
        _ood_md(res.get("ood", {})), "",
        f"## Zoo accuracy matrix (routed, task-agnostic; order {', '.join(res['tasks'])}, seed {s['seed']})", "",
        _matrix_md(res["tasks"], res["acc_matrix"]), "",
        "## Per step (zoo)", "",
        "| step | task | routing acc | task-agnostic acc | oracle acc | add-task s |", "|---|---|---|---|---|---|",
        *[f"| {p['step']} | {p['task']} | {p['routing_accuracy']:.3f} | {p['task_agnostic_acc']:.3f} | "
          f"{p['oracle_acc']:.3f} | {p['add_task_seconds']:.2f} |" for p in res["per_step"]], "",
        f"Timing: encoding {res['timing']['encode_seconds']:.1f}s, total {res['timing']['total_seconds']:.1f}s. "
        f"Peak memory (whole process): {res.get('memory', {}).get('peak_rss_mb', float('nan')):.0f} MB.",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads).", "",
        f"![accuracy matrices]({heat.name})", "", f"![accuracy over steps]({curve.name})", "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "heatmap": str(heat),
            "curves": str(curve)}
