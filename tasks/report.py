"""Benchmark reports: ``report.json``, ``report.md`` (summary table) and accuracy-matrix heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ["avg", "last", "forgetting", "bwt", "transfer", "task_agnostic_acc", "oracle_acc", "routing_accuracy"]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_table(res: dict) -> str:
    """One row per method: the zoo (routed), its oracle-routing bound, then the baselines."""
    rows = [("zoo (routed)", False, res["metrics"])] + [
        (name, b.get("uses_task_ids", False), b) for name, b in res["baselines"].items()]
    head = "| method | task ids | " + " | ".join(COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 2)
    lines = [head, sep] + [f"| {n} | {'yes' if ids else 'no'} | " + " | ".join(_fmt(m.get(c)) for c in COLUMNS) + " |"
                           for n, ids, m in rows]
    return "\n".join(lines)


def _matrix_md(tasks: list[str], R: list[list[float]]) -> str:
    head = "| after \\ on | " + " | ".join(tasks) + " |"
    sep = "|" + "---|" * (len(tasks) + 1)
    return "\n".join([head, sep] + [f"| {tasks[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                                    for i, row in enumerate(R)])


def heatmaps(res: dict, path: Path) -> Path:
    """One heatmap per method of R[i][j] (rows: after training task i; columns: evaluated on task j)."""
    mats = {"zoo (routed)": res["acc_matrix"], **{n: b["acc_matrix"] for n, b in res["baselines"].items()}}
    tasks = res["tasks"]
    fig, axes = plt.subplots(1, len(mats), figsize=(3.6 * len(mats), 3.6), squeeze=False)
    for ax, (name, R) in zip(axes[0], mats.items()):
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    axes[0][0].set_ylabel("after training on")
    fig.suptitle("accuracy matrix R[i][j] (upper triangle: zero-shot transfer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(res: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(res, indent=2) + "\n")
    heat = heatmaps(res, out / "acc_matrix.png")
    s, m = res["settings"], res["machine"]
    md = [
        "# clipzoo forgetting benchmark", "",
        f"Tasks in order: {', '.join(res['tasks'])}. Backbone: {s['backbone']} ({s['pretrained']}), "
        f"{s['backbone_params']:,} frozen parameters. Expert kind: {s['kind']}; epochs {s['epochs']}, "
        f"lr {s['lr']}, seed {s['seed']}; router: {s['router']}. Task ids at test time: no "
        "(except rows marked 'yes'). Accuracies are fractions in 0..1.", "",
        markdown_table(res), "",
        "## Zoo accuracy matrix (routed, task-agnostic)", "", _matrix_md(res["tasks"], res["acc_matrix"]), "",
        "## Per step", "",
        "| step | task | routing acc | task-agnostic acc | oracle acc | add-task s |", "|---|---|---|---|---|---|",
        *[f"| {p['step']} | {p['task']} | {p['routing_accuracy']:.3f} | {p['task_agnostic_acc']:.3f} | "
          f"{p['oracle_acc']:.3f} | {p['add_task_seconds']:.2f} |" for p in res["per_step"]], "",
        f"Timing: encoding {res['timing']['encode_seconds']:.1f}s, total {res['timing']['total_seconds']:.1f}s, "
        f"routing+expert {res['timing']['inference_ms_per_image_cached_features']:.3f} ms/image on cached features.",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads).", "",
        f"![accuracy matrices]({heat.name})", "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "heatmap": str(heat)}
