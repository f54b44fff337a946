"""The ``clipzoo`` command line: a thin layer over the Python API.

Every command prints human-readable text, or one JSON document with ``--json``. Errors are one
line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from zoo.errors import ClipzooError


class _Group(click.Group):
    """Turns any ClipzooError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClipzooError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


def _print(obj, as_json: bool, text: str | None = None) -> None:
    click.echo(json.dumps(obj, indent=2) if as_json else (text if text is not None else str(obj)))


def _expand(paths: tuple[str, ...]) -> list[Path]:
    from tasks.data import IMAGE_EXTS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise ClipzooError(f"no such image or directory: {p}")
    if not out:
        raise ClipzooError("no images found in the given paths")
    return out


zoo_option = click.option("--zoo", "zoo_dir", required=True, type=click.Path(file_okay=False), help="Zoo directory.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipzoo")
def main() -> None:
    """clipzoo: a frozen CLIP, one expert per task, routed automatically.

    \b
    Example:
      clipzoo init --zoo myzoo
      clipzoo add-task --zoo myzoo --name shapes --data builtin:shapes
      clipzoo predict --zoo myzoo --json photo.png
    """


@main.command()
@zoo_option
@click.option("--backbone", default="clipzoo-tiny", show_default=True,
              help="open_clip model name (ViT-B-32, ...) or hf-hub:org/repo.")
@click.option("--pretrained", default=None, help="Pretrained tag (laion2b_s34b_b79k) or checkpoint file; "
              "'embedded' for the built-in tiny CLIP (the default for clipzoo-tiny).")
@json_option
def init(zoo_dir: str, backbone: str, pretrained: str | None, as_json: bool) -> None:
    """Create an empty zoo on a frozen backbone.

    \b
    Example: clipzoo init --zoo myzoo --backbone ViT-B-32 --pretrained laion2b_s34b_b79k
    """
    from zoo.backbone import EMBEDDED, TINY_MODEL, BackboneSpec
    from zoo.zoo import Zoo

    if pretrained is None and backbone == TINY_MODEL:
        pretrained = EMBEDDED
    z = Zoo.create(zoo_dir, BackboneSpec(backbone, pretrained))
    bb = z.registry["backbone"]
    _print({"zoo": str(z.root), "backbone": bb}, as_json,
           f"created zoo {z.root} on {backbone} ({bb['params']:,} frozen parameters, fingerprint {bb['fingerprint'][:12]})")


@main.command("add-task")
@zoo_option
@click.option("--name", required=True, help="Task name (letters, digits, _ - .).")
@click.option("--data", required=True, help="ImageFolder DIR (DIR/train/<class>/*, DIR/test/<class>/*) or builtin:<domain>.")
@click.option("--kind", default="clip-adapter", show_default=True, help="Expert kind, or a stack joined by '+'.")
@click.option("--epochs", default=None, type=int,
              help="Training epochs [default: 20; 10 when the stack works inside an encoder: vit-adapter, vl-adapter, lora].")
@click.option("--lr", default=None, type=float, help="Learning rate [default: 2e-3; 5e-3 inside an encoder].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--set", "set_", multiple=True, metavar="KIND.KEY=VALUE",
              help="A setting of one kind in the stack (VALUE is JSON or a word), or expert.kl_weight / "
                   "expert.ensemble for the whole stack; repeatable.")
@click.option("--from", "sources", default=None, help="With --kind fusion: experts to compose, A,B,... (default: all).")
@json_option
def add_task(zoo_dir: str, name: str, data: str, kind: str, epochs: int | None, lr: float | None, seed: int,
             set_: tuple[str, ...], sources: str | None, as_json: bool) -> None:
    """Train a new expert for a task; other experts are never touched.

    \b
    Example: clipzoo add-task --zoo myzoo --name mnist --data data/mnist --epochs 30
    Example: clipzoo add-task --zoo myzoo --name cifar --data data/cifar10 --kind lora+prompt \\
               --set lora.rank=4 --set lora.blocks=[1,2] --set expert.kl_weight=1.0
    Compose existing experts (trains only a fusion layer and a head):
      clipzoo add-task --zoo myzoo --name flowers --data data/flowers --kind fusion --from mnist,cifar
    """
    from zoo.expert import parse_settings
    from zoo.train import TrainSettings, train_defaults
    from zoo.zoo import Zoo

    z = Zoo.open(zoo_dir)
    defaults = train_defaults(kind)
    epochs = defaults["epochs"] if epochs is None else epochs
    lr = defaults["lr"] if lr is None else lr
    rec = z.add_task(data, name=name, kind=kind, settings=parse_settings(set_),
                     train=TrainSettings(epochs=epochs, lr=lr, seed=seed), progress=not as_json,
                     sources=[s.strip() for s in sources.split(",") if s.strip()] if sources else None)
    m = rec["metrics"]
    text = (f"added {name} ({rec['kind']}, {len(rec['classes'])} classes, {rec['trainable_params']:,} trainable "
            f"params = {100 * rec['trainable_share']:.2f}% of the backbone) in {m['add_seconds']:.1f}s; "
            f"test acc {m.get('test_acc', float('nan')):.3f} (zero-shot {m.get('zero_shot_acc', float('nan')):.3f})")
    _print(rec, as_json, text)


@main.command("list")
@zoo_option
@json_option
def list_(zoo_dir: str, as_json: bool) -> None:
    """List the zoo's experts."""
    from zoo.zoo import Zoo

    recs = Zoo.open(zoo_dir).list()
    lines = [f"{r['name']:<20} {r['kind']:<16} {len(r['classes']):>3} classes  {r['trainable_params']:>9,} params  "
             f"test acc {r['metrics'].get('test_acc', float('nan')):.3f}  {r['sha256'][:12]}" for r in recs]
    _print(recs, as_json, "\n".join(lines) or "(no experts)")


@main.command()
@zoo_option
@click.option("--name", required=True)
@click.option("--cascade", is_flag=True, help="Also remove the fusion experts composed from it.")
@json_option
def remove(zoo_dir: str, name: str, cascade: bool, as_json: bool) -> None:
    """Remove an expert (and its files) from the zoo.

    \b
    Example: clipzoo remove --zoo myzoo --name mnist --cascade
    """
    from zoo.zoo import Zoo

    users = Zoo.open(zoo_dir).remove(name, cascade=cascade)[:-1]
    also = f" and the fusion experts composed from it: {', '.join(users)}" if users else ""
    _print({"removed": name, "cascaded": users}, as_json, f"removed {name}{also}")


@main.command()
@zoo_option
@json_option
def verify(zoo_dir: str, as_json: bool) -> None:
    """Recompute every file's sha256; exit 1 on any mismatch."""
    from zoo.zoo import Zoo

    rep = Zoo.open(zoo_dir).verify()
    _print(rep, as_json, "ok: all hashes match" if rep["ok"] else "FAILED:\n" + "\n".join(rep["problems"]))
    if not rep["ok"]:
        sys.exit(1)


@main.command("router")
@zoo_option
@click.option("--kind", type=click.Choice(["learned", "nearest-stats"]), default=None,
              help="Switch the routing policy (rebuilds the router from the stored statistics).")
@click.option("--ood-quantile", default=None, type=float,
              help="In-distribution quantile that sets the zero-shot fallback threshold (e.g. 0.99).")
@click.option("--rebuild", is_flag=True, help="Retrain the router from every task's statistics.")
@json_option
def router_cmd(zoo_dir: str, kind: str | None, ood_quantile: float | None, rebuild: bool, as_json: bool) -> None:
    """Show the zoo's router, or change it (a new router version; experts are never touched).

    \b
    Example: clipzoo router --zoo myzoo
             clipzoo router --zoo myzoo --kind nearest-stats --ood-quantile 0.995
    """
    from zoo.zoo import Zoo

    z = Zoo.open(zoo_dir)
    if kind or ood_quantile is not None or rebuild:
        z.refresh_router(kind=kind, ood_quantile=ood_quantile)
    spec = dict(z.registry["router"])
    info = {**spec, "experts": z.names}
    text = (f"router {spec['kind']} v{spec['version']} over {len(z.names)} experts"
            f" ({', '.join(z.names) or 'none'}); files: {', '.join(sorted(spec['files'])) or 'none'}")
    _print(info, as_json, text)


@main.command()
@zoo_option
@click.option("--task", default=None, help="Use this expert for every image (no routing).")
@click.option("--top-k", default=1, show_default=True, type=int, help="Routing weights reported per image.")
@click.option("--mode", type=click.Choice(["top1", "avg", "fusion"]), default="top1", show_default=True,
              help="Answer with the router's first expert, the uniform average of the top-k, or their fusion "
                   "(avg and fusion need --top-k 2 or more; fusion reports its weights per image).")
@click.option("--no-fallback", is_flag=True, help="Always answer with an expert, even for images of no known task.")
@click.option("--classes", default=None, help="Comma-separated class names for the zero-shot fallback "
              "(default: every expert's classes).")
@json_option
@click.argument("images", nargs=-1, required=True)
def predict(zoo_dir: str, task: str | None, top_k: int, mode: str, no_fallback: bool, classes: str | None,
            as_json: bool, images: tuple[str, ...]) -> None:
    """Predict labels for images (files or folders), routing each to its task. An image of no
    known task (calibrated OOD score > 0) is answered by zero-shot CLIP and marked fallback.

    \b
    Example: clipzoo predict --zoo myzoo --top-k 2 --json pile/
             clipzoo predict --zoo myzoo --classes "cat,dog,boat" photo.png
    """
    from zoo.zoo import Zoo

    names = [c.strip() for c in classes.split(",")] if classes is not None else None
    preds = Zoo.open(zoo_dir).predict(_expand(images), task=task, top_k=top_k, progress=not as_json, mode=mode,
                                      fallback=not no_fallback, classes=names)
    _print(preds, as_json, "\n".join(
        f"{p['path']}\t{p['task'] or 'zero-shot (fallback)'}\t{p['label']}\t{p['score']:.3f}" + "".join(
        "\t" + ",".join(f"{n}:{w:.2f}" for n, w in p[key].items()) for key in ("fusion", "sources") if key in p)
        for p in preds))


@main.command()
@zoo_option
@click.option("--data", required=True, help="ImageFolder DIR or builtin:<domain>; its test split is evaluated.")
@click.option("--task", default=None, help="Give the task id (oracle); without it images are routed.")
@json_option
def evaluate(zoo_dir: str, data: str, task: str | None, as_json: bool) -> None:
    """Accuracy on a data set's test split, routed or with the task given."""
    from zoo.zoo import Zoo

    r = Zoo.open(zoo_dir).evaluate(data, task=task, progress=not as_json)
    extra = f", routing accuracy {r['routing_accuracy']:.3f}" if "routing_accuracy" in r else ""
    _print(r, as_json, f"accuracy {r['accuracy']:.3f} on {r['n']} images (task ids {r['task_ids']}{extra})")


@main.command()
@click.argument("domains", nargs=-1)
@click.option("--builtin", "builtin", type=click.Choice(["synthetic"]), default=None,
              help="Use the built-in synthetic domains.")
@click.option("--seed", default=0, show_default=True, type=int, help="First seed; also draws the task orders.")
@click.option("--seeds", default=1, show_default=True, type=int, help="Seeds per order: SEED, SEED+1, ...")
@click.option("--orders", default=1, show_default=True, type=int,
              help="Task orders: the given one, then random permutations drawn with --seed.")
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--kind", default="clip-adapter", show_default=True, help="The zoo's expert kind.")
@click.option("--methods", default=None, help="Comma-separated baselines (default: zero-shot,naive,ewc,lwf,zscl,"
              "joint, plus avalanche-naive,avalanche-ewc,avalanche-lwf when avalanche-lib is installed).")
@click.option("--holdout", default=None, help="A domain kept out of training (a task name of the sequence, a "
              "DIR or builtin:<domain>) to measure the zoo's OOD fallback.")
@click.option("--resume", is_flag=True, help="Continue a crashed run in --out from its finished steps.")
@click.option("--threads", default=1, show_default=True, type=int, help="torch threads for training and evaluation.")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench(domains: tuple[str, ...], builtin: str | None, seed: int, seeds: int, orders: int, epochs: int, lr: float,
          kind: str, methods: str | None, holdout: str | None, resume: bool, threads: int, out: str,
          as_json: bool) -> None:
    """Forgetting benchmark: the zoo against baselines on one task sequence (ImageFolder DIRs in
    order, a folder of such DIRs, or --builtin synthetic). Writes report.json, report.md and plots.

    \b
    Examples:
      clipzoo bench data/mnist data/cifar10 data/gtsrb --out report/
      clipzoo bench data/ --orders 3 --holdout skin_lesion --out report/
      clipzoo bench data/ --out report/ --resume      # after a crash
    """
    from tasks.harness import BenchSettings, default_methods, run_benchmark
    from tasks.report import markdown_table
    from tasks.sequence import load_sequence, split_holdout

    seq, held = split_holdout(load_sequence(list(domains), builtin), holdout)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else default_methods()
    settings = BenchSettings(seed=seed, seeds=seeds, orders=orders, epochs=epochs, lr=lr, kind=kind, methods=chosen,
                             threads=threads)
    res = run_benchmark(seq, settings, out=Path(out), progress=not as_json, holdout=held, resume=resume)
    _print(res, as_json, markdown_table(res) + f"\n\nreport written to {out}/ (report.md, report.json, *.png)")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def demo(out: str, as_json: bool) -> None:
    """A zoo over the built-in domains, a short benchmark, the table and the report."""
    from tasks.demo import run_demo

    res = run_demo(Path(out), progress=not as_json)
    if as_json:
        _print(res, True)


@main.command("pretrain-tiny", hidden=True)
@click.option("--out", default=None, help="Where to write the weights (default: the packaged asset).")
@click.option("--config", default=None, help="open_clip model config JSON (default: the packaged clipzoo-tiny.json).")
@click.option("--samples", default=36_000, show_default=True, type=int, help="Procedural image/caption pairs drawn.")
@click.option("--epochs", default=6, show_default=True, type=int)
@click.option("--seed", default=0, type=int)
@json_option
def pretrain_tiny(out: str | None, config: str | None, samples: int, epochs: int, seed: int, as_json: bool) -> None:
    """Maintainers: re-create the embedded tiny CLIP's weights.

    Example: clipzoo pretrain-tiny --config zoo/assets/clipzoo-tiny.json --out /tmp/tiny.safetensors
    """
    from zoo.backbone import EMBEDDED_WEIGHTS
    from zoo.pretrain import DEFAULT_CONFIG
    from zoo.pretrain import pretrain_tiny as run

    path = run(Path(out) if out else EMBEDDED_WEIGHTS, Path(config) if config else DEFAULT_CONFIG,
               n_samples=samples, epochs=epochs, seed=seed, progress=not as_json)
    _print({"weights": str(path)}, as_json, str(path))


@main.command("bench-fusion")
@click.argument("domains", nargs=-1, required=True)
@click.option("--new", "new_task", required=True, help="ImageFolder DIR of the new task learned few-shot.")
@click.option("--shots", default="4,16,all", show_default=True, help="Training images per class of the new task.")
@click.option("--top-k", default=2, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--out", default="bench-fusion-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench_fusion(domains: tuple[str, ...], new_task: str, shots: str, top_k: int, seed: int, epochs: int, out: str,
                 as_json: bool) -> None:
    """Top-1 routing vs top-k averaging vs top-k fusion, and fusion-composed vs fresh experts few-shot.

    \b
    Example: clipzoo bench-fusion data/mnist data/fashion_mnist data/cifar10 data/gtsrb --new data/flowers
    """
    from tasks.data import load_imagefolder
    from tasks.fusion_bench import FusionBenchSettings, markdown_tables, run_fusion_bench
    from zoo.errors import ConfigError

    try:
        shot_list = [None if v.strip() == "all" else int(v) for v in shots.split(",")]
    except ValueError:
        raise ConfigError(f"bad --shots {shots!r}: use numbers and 'all', e.g. 4,16,all") from None
    if len(domains) < 2 or any(v is not None and v < 1 for v in shot_list):
        raise ConfigError("bench-fusion needs at least 2 DOMAIN_DIRs and --shots values >= 1 (or 'all')")
    s = FusionBenchSettings(top_k=top_k, shots=shot_list, seed=seed, epochs=epochs)
    res = run_fusion_bench([load_imagefolder(d) for d in domains], load_imagefolder(new_task), s, out=Path(out),
                           progress=not as_json)
    _print(res, as_json, markdown_tables(res) + f"\n\nreport written to {out}/")


@main.command("bench-kinds")
@click.argument("domains", nargs=-1, required=True)
@click.option("--methods", default=None, help="Comma-separated kinds or '+' stacks (default: every kind and two stacks).")
@click.option("--epochs", default=None, type=int, help="The same for every kind (default: each kind's own).")
@click.option("--lr", default=None, type=float, help="The same for every kind (default: each kind's own).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--repeats", default=7, show_default=True, type=int, help="Latency repeats (median).")
@click.option("--batch", default=128, show_default=True, type=int, help="Latency batch size.")
@click.option("--out", default="bench-kinds", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench_kinds(domains: tuple[str, ...], methods: str | None, epochs: int | None, lr: float | None, seed: int,
                repeats: int, batch: int, out: str, as_json: bool) -> None:
    """Expert kinds side by side on DOMAINS (DIRs or builtin:<domain>): accuracy, trainable
    parameters, training time and inference overhead versus the frozen backbone, in one run.

    \b
    Example: clipzoo bench-kinds data/mnist data/cifar10 --out bench-kinds/
    """
    from tasks.kinds_bench import METHODS, run_kinds_bench

    kinds = methods.split(",") if methods else METHODS
    res = run_kinds_bench(list(domains), kinds, epochs, lr, seed, repeats, batch, out=Path(out),
                          echo=(lambda line: None) if as_json else click.echo)
    _print(res, as_json, f"wrote {Path(out) / 'kinds.md'}")


@main.command("bench-router")
@click.argument("domains", nargs=-1)
@click.option("--holdout", default=None, help="A domain never learned: OOD AUROC and fallback rates on it.")
@click.option("--scale", default=0, show_default=True, type=int,
              help="Also time the router update per added task up to N synthetic tasks (0: skip).")
@click.option("--epochs", default=20, show_default=True, type=int, help="Expert training epochs per domain.")
@click.option("--exemplars", default=0, show_default=True, type=int,
              help="Also run a learned router keeping this many real features per task (0: off).")
@click.option("--ood-quantile", default=0.99, show_default=True, type=float,
              help="Held-out in-distribution quantile that sets the fallback threshold.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write router-bench.json here.")
@json_option
def bench_router(domains: tuple[str, ...], holdout: str | None, scale: int, epochs: int, exemplars: int,
                 ood_quantile: float, seed: int, out: str | None, as_json: bool) -> None:
    """Learned router vs nearest-statistics routing over DOMAINS learned in order (DIRs or
    builtin:<domain>): routing, task-agnostic and oracle accuracy per step; OOD fallback on a
    held-out domain; update cost as experts grow (synthetic tasks).

    \b
    Example: clipzoo bench-router data/mnist data/fashion_mnist data/cifar10 data/gtsrb data/rsscn7 \\
               --holdout data/flowers --scale 32 --out router-report/
    """
    from router.bench import RouterBenchSettings, run_router_bench, summary_text

    s = RouterBenchSettings(epochs=epochs, seed=seed, exemplars=exemplars, ood_quantile=ood_quantile)
    res = run_router_bench(list(domains), holdout, scale, s, Path(out) if out else None, progress=not as_json)
    _print(res, as_json, summary_text(res))


from zoo import cli_hub  # noqa: E402,F401  (registers push/pull)

if __name__ == "__main__":
    main()
