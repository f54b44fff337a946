"""``clipzoo demo``: the built-in domains written as ImageFolder data, a short benchmark through
them (a real zoo in ``OUT/zoo``), the table printed and the report written."""

from __future__ import annotations

from pathlib import Path

import click

from clipzoo.tasks.data import builtin_domains, load_builtin, load_imagefolder, write_imagefolder
from clipzoo.bench.harness import BenchSettings, run_benchmark
from clipzoo.bench.report import markdown_table


def run_demo(out: Path, verbose: bool = True) -> dict:
    """Write the built-in domains as ImageFolders under ``out/data``, benchmark them, and (``verbose``) print the table."""
    data = out / "data"
    seq = []
    for d in builtin_domains():
        if not (data / d / "train").is_dir():
            write_imagefolder(load_builtin(d), data / d)
        seq.append(load_imagefolder(data / d))
    res = run_benchmark(seq, BenchSettings(), out=out)
    if verbose:
        click.echo(markdown_table(res))
        m = res["metrics"]
        click.echo(f"\nzoo: routing accuracy {m['routing_accuracy']:.3f}, task-agnostic {m['task_agnostic_acc']:.3f} "
                   f"vs oracle {m['oracle_acc']:.3f}; forgetting {m['forgetting']:.3f} vs adapter-naive "
                   f"{res['baselines']['adapter-naive']['forgetting']:.3f}")
        click.echo(f"report: {out}/report.md, {out}/acc_matrix.png; zoo: {out}/zoo "
                   f"(try: clipzoo predict --zoo {out}/zoo {data}/shapes/test)")
    return res
