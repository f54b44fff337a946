"""Leaf commands that answer with a zoo: predict and evaluate."""

from __future__ import annotations

import sys

import click

from clipzoo.cli.options import (at_least_one, data_callback, emit, existing_zoo_option, expand_images,
                                 json_option)
from clipzoo.errors import ConfigError


@click.command()
@existing_zoo_option
@click.option("--task", default=None, help="Use this expert for every image (no routing).")
@click.option("--top-k", default=1, show_default=True, type=int, callback=at_least_one,
              help="Routing weights reported per image.")
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
    An unreadable image (not an image, truncated, a decompression bomb) is reported in its place
    ("error" in the JSON) while the others are answered; the exit status is then 2.

    \b
    Example: clipzoo predict --zoo myzoo --top-k 2 --json pile/
             clipzoo predict --zoo myzoo --classes "cat,dog,boat" photo.png
    """
    paths = expand_images(images)
    names = [c.strip() for c in classes.split(",")] if classes is not None else None
    if names is not None and not all(names):
        raise ConfigError(f"bad --classes {classes!r}: give comma-separated non-empty names, e.g. cat,dog,boat")
    if mode != "top1" and task is None and top_k < 2:
        raise ConfigError(f"mode {mode!r} combines the router's top-k experts: use --top-k 2 or more")
    from clipzoo.zoo.zoo import Zoo

    preds = Zoo.open(zoo_dir).predict(paths, task=task, top_k=top_k, mode=mode, fallback=not no_fallback,
                                      classes=names)
    emit(preds, as_json, "\n".join(_line(p) for p in preds))
    failed = sum("error" in p for p in preds)
    if failed:
        if not as_json:  # with --json, stdout is the whole report
            click.echo(f"error: {failed} of {len(preds)} images could not be read (see above)", err=True)
        sys.exit(2)


def _line(p: dict) -> str:
    """One answer as a tab-separated line for a person."""
    if "error" in p:
        return f"{p['path']}\terror: {p['error']}"
    return f"{p['path']}\t{p['task'] or 'zero-shot (fallback)'}\t{p['label']}\t{p['score']:.3f}" + "".join(
        "\t" + ",".join(f"{n}:{w:.2f}" for n, w in p[key].items()) for key in ("fusion", "sources") if key in p)


@click.command()
@existing_zoo_option
@click.option("--data", required=True, callback=data_callback,
              help="ImageFolder DIR or builtin:<domain>; its test split is evaluated.")
@click.option("--task", default=None, help="Give the task id (oracle); without it images are routed.")
@json_option
def evaluate(zoo_dir: str, data: str, task: str | None, as_json: bool) -> None:
    """Accuracy on a data set's test split, routed or with the task given."""
    from clipzoo.zoo.zoo import Zoo

    r = Zoo.open(zoo_dir).evaluate(data, task=task)
    extra = f", routing accuracy {r['routing_accuracy']:.3f}" if "routing_accuracy" in r else ""
    emit(r, as_json, f"accuracy {r['accuracy']:.3f} on {r['n']} images (task ids {r['task_ids']}{extra})")
