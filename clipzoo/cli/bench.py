"""Leaf commands of the benchmark package (``clipzoo.bench``): bench, demo, bench-kinds,
bench-router, bench-fusion, and the maintainers' pretrain-tiny."""

from __future__ import annotations

from pathlib import Path

import click

from clipzoo.cli.options import (at_least_one, data_callback, emit, existing_file, fraction, json_option, non_negative,
                                 positive)


@click.command()
@click.argument("domains", nargs=-1, callback=data_callback)
@click.option("--builtin", "builtin", type=click.Choice(["synthetic"]), default=None,
              help="Use the built-in synthetic domains.")
@click.option("--seed", default=0, show_default=True, type=int, help="First seed; also draws the task orders.")
@click.option("--seeds", default=1, show_default=True, type=int, callback=at_least_one,
              help="Seeds per order: SEED, SEED+1, ...")
@click.option("--orders", default=1, show_default=True, type=int, callback=at_least_one,
              help="Task orders: the given one, then random permutations drawn with --seed.")
@click.option("--epochs", default=20, show_default=True, type=int, callback=at_least_one)
@click.option("--lr", default=2e-3, show_default=True, type=float, callback=positive)
@click.option("--kind", default="clip-adapter", show_default=True, help="The zoo's expert kind.")
@click.option("--methods", default=None, help="Comma-separated baselines (default: all of zero-shot, slda; "
              "adapter-naive, adapter-ewc, adapter-lwf, adapter-zscl, adapter-joint (one shared CLIP-Adapter on "
              "cached features); ft-naive, ft-zscl, clip-cite (full fine-tuning of the CLIP towers on pixels); "
              "plus avalanche-naive, avalanche-ewc, avalanche-lwf when avalanche-lib is installed).")
@click.option("--holdout", default=None, help="A domain kept out of training (a task name of the sequence, a "
              "DIR or builtin:<domain>) to measure the zoo's OOD fallback.")
@click.option("--resume", is_flag=True, help="Continue a crashed run in --out from its finished steps.")
@click.option("--no-tune", "no_tune", is_flag=True, help="Use the default baseline hyper-parameters instead of "
              "choosing each on validation data (faster; the report says so).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, callback=fraction,
              help="Share of each training split (per class) held out to choose the baselines' hyper-parameters.")
@click.option("--threads", default=1, show_default=True, type=int, callback=at_least_one,
              help="torch threads for training and evaluation.")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the independent runs (order x seed) execute: here, one after the other, or as Ray "
                   "tasks (pip install 'clipzoo[ray]'; --out must then be on a filesystem every node shares).")
@click.option("--address", default=None, help="With --executor ray: a running cluster (auto, HOST:6379 or "
              "ray://HOST:10001); default: a local Ray instance on this machine's CPUs.")
@json_option
def bench(domains: tuple[str, ...], builtin: str | None, seed: int, seeds: int, orders: int, epochs: int, lr: float,
          kind: str, methods: str | None, holdout: str | None, resume: bool, no_tune: bool, val_fraction: float,
          threads: int, out: str, executor: str, address: str | None, as_json: bool) -> None:
    """Forgetting benchmark: the zoo against baselines on one task sequence (ImageFolder DIRs in
    order, a folder of such DIRs, or --builtin synthetic). Writes report.json, report.md and plots.

    \b
    Examples:
      clipzoo bench data/mnist data/cifar10 data/gtsrb --out report/
      clipzoo bench data/ --orders 3 --holdout skin_lesion --out report/
      clipzoo bench data/ --out report/ --resume      # after a crash
      clipzoo bench data/ --orders 3 --seeds 2 --executor ray --address auto --out /shared/report/
    """
    from clipzoo.bench.executor import make_executor
    from clipzoo.bench.harness import BenchSettings, default_methods, run_benchmark
    from clipzoo.bench.report import markdown_table
    from clipzoo.tasks.sequence import load_sequence, split_holdout

    seq, held = split_holdout(load_sequence(list(domains), builtin), holdout)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else default_methods()
    settings = BenchSettings(seed=seed, seeds=seeds, orders=orders, epochs=epochs, lr=lr, kind=kind, methods=chosen,
                             threads=threads, tune=not no_tune, val_fraction=val_fraction)
    ex = make_executor(executor, address)
    res = run_benchmark(seq, settings, out=Path(out), holdout=held, resume=resume, executor=ex)
    emit(res, as_json, markdown_table(res) + f"\n\nreport written to {out}/ (report.md, report.json, *.png)")


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def demo(out: str, as_json: bool) -> None:
    """A zoo over the built-in domains, a short benchmark, the table and the report."""
    from clipzoo.bench.demo import run_demo

    res = run_demo(Path(out), verbose=not as_json)
    if as_json:
        emit(res, True)


@click.command("pretrain-tiny", hidden=True)
@click.option("--out", default=None, help="Where to write the weights (default: the packaged asset).")
@click.option("--config", default=None, callback=existing_file,
              help="open_clip model config JSON (default: the packaged clipzoo-tiny.json).")
@click.option("--samples", default=36_000, show_default=True, type=int, callback=at_least_one,
              help="Procedural image/caption pairs drawn.")
@click.option("--epochs", default=6, show_default=True, type=int, callback=at_least_one)
@click.option("--seed", default=0, type=int)
@json_option
def pretrain_tiny(out: str | None, config: str | None, samples: int, epochs: int, seed: int, as_json: bool) -> None:
    """Maintainers: re-create the embedded tiny CLIP's weights.

    Example: clipzoo pretrain-tiny --config zoo/assets/clipzoo-tiny.json --out /tmp/tiny.safetensors
    """
    from clipzoo.zoo.backbone import EMBEDDED_WEIGHTS
    from clipzoo.bench.pretrain_tiny import DEFAULT_CONFIG
    from clipzoo.bench.pretrain_tiny import pretrain_tiny as run

    path = run(Path(out) if out else EMBEDDED_WEIGHTS, Path(config) if config else DEFAULT_CONFIG,
               n_samples=samples, epochs=epochs, seed=seed)
    emit({"weights": str(path)}, as_json, str(path))


@click.command("bench-fusion")
@click.argument("domains", nargs=-1, required=True, callback=data_callback)
@click.option("--new", "new_task", required=True, callback=data_callback,
              help="ImageFolder DIR of the new task learned few-shot.")
@click.option("--shots", default="4,16,all", show_default=True, help="Training images per class of the new task.")
@click.option("--top-k", default=2, show_default=True, type=int, callback=at_least_one)
@click.option("--seed", default=0, show_default=True, type=int, help="First seed of every expert's training.")
@click.option("--seeds", default=1, show_default=True, type=int, callback=at_least_one,
              help="Repeat the run with seeds SEED..SEED+N-1 (mean and std; per-seed results in the JSON).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, callback=fraction,
              help="Share of each domain's training split (per class) carved out as the validation split "
                   "the modes are chosen on.")
@click.option("--epochs", default=20, show_default=True, type=int, callback=at_least_one)
@click.option("--out", default="bench-fusion-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench_fusion(domains: tuple[str, ...], new_task: str, shots: str, top_k: int, seed: int, seeds: int,
                 val_fraction: float, epochs: int, out: str, as_json: bool) -> None:
    """Top-1 routing vs top-k averaging vs top-k fusion (scored on a validation split carved from the
    training data, the choice, and on test), and fusion-composed vs fresh experts few-shot; every
    expert seeded, over --seeds seeds.

    \b
    Example: clipzoo bench-fusion data/mnist data/fashion_mnist data/cifar10 data/gtsrb --new data/flowers --seeds 3
    """
    from clipzoo.tasks.data import load_imagefolder
    from clipzoo.bench.fusion import FusionBenchSettings, markdown_tables, run_fusion_bench
    from clipzoo.errors import ConfigError

    try:
        shot_list = [None if v.strip() == "all" else int(v) for v in shots.split(",")]
    except ValueError:
        raise ConfigError(f"bad --shots {shots!r}: use numbers and 'all', e.g. 4,16,all") from None
    if len(domains) < 2 or any(v is not None and v < 1 for v in shot_list):
        raise ConfigError("bench-fusion needs at least 2 DOMAIN_DIRs and --shots values >= 1 (or 'all')")
    s = FusionBenchSettings(top_k=top_k, shots=shot_list, seed=seed, seeds=seeds, epochs=epochs,
                            val_fraction=val_fraction)
    res = run_fusion_bench([load_imagefolder(d) for d in domains], load_imagefolder(new_task), s, out=Path(out))
    emit(res, as_json, markdown_tables(res) + f"\n\nreport written to {out}/")


@click.command("bench-kinds")
@click.argument("domains", nargs=-1, required=True, callback=data_callback)
@click.option("--methods", default=None, help="Comma-separated kinds or '+' stacks (default: every kind and two stacks).")
@click.option("--epochs", default=None, type=int, callback=at_least_one,
              help="The same for every kind (default: each kind's own).")
@click.option("--lr", default=None, type=float, callback=positive,
              help="The same for every kind (default: each kind's own).")
@click.option("--lrs", default=None,
              help="Comma-separated LRs: each kind runs at each, and the LR best on validation is named "
                   "per domain and kind, beside the kind's default (not with --lr).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, callback=fraction,
              help="Share of each training split (per class) carved out as the validation split; "
                   "methods train on the rest.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--repeats", default=7, show_default=True, type=int, callback=at_least_one,
              help="Latency repeats (median).")
@click.option("--batch", default=128, show_default=True, type=int, callback=at_least_one, help="Latency batch size.")
@click.option("--out", default="bench-kinds", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench_kinds(domains: tuple[str, ...], methods: str | None, epochs: int | None, lr: float | None, lrs: str | None,
                val_fraction: float, seed: int, repeats: int, batch: int, out: str, as_json: bool) -> None:
    """Expert kinds side by side on DOMAINS (DIRs or builtin:<domain>): validation and test accuracy,
    trainable parameters, training time and inference overhead versus the frozen backbone, in one
    run; every method trains on the training split less the validation split. With --lrs, the LR
    each kind scores best on validation, against its default.

    \b
    Example: clipzoo bench-kinds data/mnist data/cifar10 --out bench-kinds/
             clipzoo bench-kinds data/mnist --methods lora,prompt --lrs 1e-3,3e-3,1e-2
    """
    from clipzoo.bench.kinds import METHODS, parse_lrs, run_kinds_bench

    kinds = methods.split(",") if methods else METHODS
    res = run_kinds_bench(list(domains), kinds, epochs, lr, seed, repeats, batch, out=Path(out),
                          echo=(lambda line: None) if as_json else click.echo, val_fraction=val_fraction,
                          lrs=parse_lrs(lrs))
    emit(res, as_json, f"wrote {Path(out) / 'kinds.md'}")


@click.command("bench-router")
@click.argument("domains", nargs=-1, callback=data_callback)
@click.option("--lodo", is_flag=True,
              help="Also leave-one-domain-out OOD: each domain held out once from the others' statistics.")
@click.option("--scale", default=0, show_default=True, type=int, callback=non_negative,
              help="Also time the router update per added task up to N synthetic tasks (0: skip).")
@click.option("--epochs", default=20, show_default=True, type=int, callback=at_least_one,
              help="Expert training epochs per domain.")
@click.option("--seeds", default=1, show_default=True, type=int, callback=at_least_one,
              help="Repeat the sequence with experts trained from seeds SEED..SEED+N-1 (mean and std).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, callback=fraction,
              help="Share of each training split (per class) carved out as the validation split for choices.")
@click.option("--ood-quantile", default=0.99, show_default=True, type=float, callback=fraction,
              help="Held-out in-distribution quantile that sets the fallback threshold.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write router-bench.json here.")
@json_option
def bench_router(domains: tuple[str, ...], lodo: bool, scale: int, epochs: int, seeds: int, val_fraction: float,
                 ood_quantile: float, seed: int, out: str | None, as_json: bool) -> None:
    """Routed answers against the same experts given the task, over DOMAINS learned in order (DIRs
    or builtin:<domain>): routers ranpac (default), learned and nearest-stats; the zoo's answer
    with and without the class posterior; slda on the same features; a ranpac settings grid scored
    on validation (the choice) and test; leave-one-domain-out OOD; update cost as experts grow.

    \b
    Example: clipzoo bench-router ../shared/data/* --seeds 3 --lodo --scale 32 --out router-report/
    """
    from clipzoo.bench.router import RouterBenchSettings, run_router_bench, summary_text

    s = RouterBenchSettings(epochs=epochs, seed=seed, seeds=seeds, val_fraction=val_fraction, ood_quantile=ood_quantile)
    res = run_router_bench(list(domains), lodo, scale, s, Path(out) if out else None)
    emit(res, as_json, summary_text(res))


@click.command("bench-cost")
@click.option("--runs", default=5, show_default=True, type=int, callback=at_least_one,
              help="Subprocess runs per command (median).")
@click.option("--small", default=1000, show_default=True, type=int, callback=at_least_one,
              help="Cached entries for the first hit measurement.")
@click.option("--large", default=50_000, show_default=True, type=int, callback=at_least_one,
              help="Cached entries for the second hit measurement.")
@click.option("--dim", default=512, show_default=True, type=int, callback=at_least_one, help="Feature width.")
@click.option("--zoo", "zoo_dir", default=None, type=click.Path(file_okay=False),
              help="Time list/verify/router on this zoo (default: a small zoo built in a temp dir).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@json_option
def bench_cost(runs: int, small: int, large: int, dim: int, zoo_dir: str | None, out: str | None,
               as_json: bool) -> None:
    """What the ceremony costs: startup of light commands against --help, feature-cache hits at
    small and large cache sizes, and whether a predict of cached images builds the model.

    \b
    Example: clipzoo bench-cost --json --out cost.json
    """
    import json

    from clipzoo.bench.cost import markdown, run_cost

    if large < small:
        from clipzoo.errors import ConfigError

        raise ConfigError(f"--large ({large}) must be at least --small ({small})")
    res = run_cost(runs=runs, small=small, large=large, dim=dim, zoo=Path(zoo_dir) if zoo_dir else None)
    if out:
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
    emit(res, as_json, markdown(res))
