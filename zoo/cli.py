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
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def add_task(zoo_dir: str, name: str, data: str, kind: str, epochs: int, lr: float, seed: int, as_json: bool) -> None:
    """Train a new expert for a task; other experts are never touched.

    \b
    Example: clipzoo add-task --zoo myzoo --name mnist --data data/mnist --epochs 30
    """
    from zoo.train import TrainSettings
    from zoo.zoo import Zoo

    z = Zoo.open(zoo_dir)
    rec = z.add_task(data, name=name, kind=kind, train=TrainSettings(epochs=epochs, lr=lr, seed=seed),
                     progress=not as_json)
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
@json_option
def remove(zoo_dir: str, name: str, as_json: bool) -> None:
    """Remove an expert (and its files) from the zoo."""
    from zoo.zoo import Zoo

    Zoo.open(zoo_dir).remove(name)
    _print({"removed": name}, as_json, f"removed {name}")


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


@main.command()
@zoo_option
@click.option("--task", default=None, help="Use this expert for every image (no routing).")
@click.option("--top-k", default=1, show_default=True, type=int, help="Routing weights reported per image.")
@json_option
@click.argument("images", nargs=-1, required=True)
def predict(zoo_dir: str, task: str | None, top_k: int, as_json: bool, images: tuple[str, ...]) -> None:
    """Predict labels for images (files or folders), routing each to its task.

    \b
    Example: clipzoo predict --zoo myzoo --top-k 2 --json pile/
    """
    from zoo.zoo import Zoo

    preds = Zoo.open(zoo_dir).predict(_expand(images), task=task, top_k=top_k, progress=not as_json)
    _print(preds, as_json, "\n".join(f"{p['path']}\t{p['task']}\t{p['label']}\t{p['score']:.3f}" for p in preds))


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
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@json_option
def bench(domains: tuple[str, ...], builtin: str | None, seed: int, epochs: int, out: str, as_json: bool) -> None:
    """Forgetting benchmark over a task sequence (ImageFolder DIRs in order, or --builtin synthetic).

    \b
    Example: clipzoo bench data/mnist data/cifar10 data/gtsrb --out report/
    """
    from tasks.harness import BenchSettings, load_sequence, run_benchmark
    from tasks.report import markdown_table

    seq = load_sequence(list(domains), builtin)
    res = run_benchmark(seq, BenchSettings(seed=seed, epochs=epochs), out=Path(out), progress=not as_json)
    _print(res, as_json, markdown_table(res) + f"\n\nreport written to {out}/")


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
@click.option("--seed", default=0, type=int)
def pretrain_tiny(out: str | None, seed: int) -> None:
    """Maintainers: re-create the embedded tiny CLIP's weights."""
    from zoo.backbone import EMBEDDED_WEIGHTS
    from zoo.pretrain import pretrain_tiny as run

    click.echo(str(run(Path(out) if out else EMBEDDED_WEIGHTS, seed=seed)))


if __name__ == "__main__":
    main()
