"""Leaf commands that create and change a zoo: init, add-task, list, remove, verify, router."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipzoo.cli.options import (at_least_one, data_callback, emit, existing_zoo_option, fraction, json_option,
                                 new_zoo_option, positive)
from clipzoo.errors import ConfigError


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from clipzoo.tasks.spec import check_name

    return check_name(value)


def _settings(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """The shape of each ``--set KIND.KEY=VALUE`` (its meaning is checked with the expert kind)."""
    for pair in value:
        key, eq, _ = pair.partition("=")
        kind, dot, field_name = key.strip().partition(".")
        if not (eq and dot and kind and field_name):
            raise ConfigError(f"bad setting {pair!r}: use KIND.KEY=VALUE, e.g. lora.rank=8")
    return value


@click.command()
@new_zoo_option
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
    from clipzoo.zoo.backbone import EMBEDDED, TINY_MODEL, BackboneSpec
    from clipzoo.zoo.zoo import Zoo

    if pretrained is None and backbone == TINY_MODEL:
        pretrained = EMBEDDED
    z = Zoo.create(zoo_dir, BackboneSpec(backbone, pretrained))
    bb = z.registry["backbone"]
    emit({"zoo": str(z.root), "backbone": bb}, as_json,
           f"created zoo {z.root} on {backbone} ({bb['params']:,} frozen parameters, fingerprint {bb['fingerprint'][:12]})")


def _names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from clipzoo.tasks.spec import check_name

    return tuple(check_name(v) for v in value)


def _task_names(names: tuple[str, ...], data: tuple[str, ...]) -> list[str]:
    """One name per ``--data``: the ``--name``s given, else each folder's (or built-in domain's) name."""
    from clipzoo.tasks.data import BUILTIN_PREFIX
    from clipzoo.tasks.spec import check_name

    if names and len(names) != len(data):
        raise ConfigError(f"{len(names)} --name for {len(data)} --data: give one --name per --data, or none "
                          "(the folder names are used)")
    return list(names) or [check_name(d[len(BUILTIN_PREFIX):] if d.startswith(BUILTIN_PREFIX)
                                      else Path(d).resolve().name) for d in data]


@click.command("add-task")
@existing_zoo_option
@click.option("--name", "names", multiple=True, callback=_names,
              help="Task name (letters, digits, _ - .); one per --data [default: the folder's name].")
@click.option("--data", multiple=True, required=True, callback=data_callback,
              help="ImageFolder DIR (DIR/train/<class>/*, DIR/test/<class>/*) or builtin:<domain>; repeat it "
                   "to add several tasks at once, trained in parallel.")
@click.option("--kind", default="clip-adapter", show_default=True, help="Expert kind, or a stack joined by '+'.")
@click.option("--epochs", default=None, type=int, callback=at_least_one,
              help="Training epochs [default: 20; 10 when the stack works inside an encoder: vit-adapter, vl-adapter, lora].")
@click.option("--lr", default=None, type=float, callback=positive,
              help="Learning rate [default: 2e-3; 5e-3 inside an encoder].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--set", "set_", multiple=True, callback=_settings, metavar="KIND.KEY=VALUE",
              help="A setting of one kind in the stack (VALUE is JSON or a word), or expert.kl_weight / "
                   "expert.ensemble for the whole stack; repeatable.")
@click.option("--from", "sources", default=None, help="With --kind fusion: experts to compose, A,B,... (default: all).")
@click.option("--workers", default=None, type=int, callback=at_least_one,
              help="With several --data: worker processes training at once [default: the CPU count].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="With several --data: local worker processes, or Ray tasks (pip install 'clipzoo[ray]').")
@click.option("--address", default=None, help="With --executor ray: a running cluster (auto, HOST:6379, "
              "ray://HOST:10001); default: a local Ray instance.")
@json_option
def add_task(zoo_dir: str, names: tuple[str, ...], data: tuple[str, ...], kind: str, epochs: int | None,
             lr: float | None, seed: int, set_: tuple[str, ...], sources: str | None, workers: int | None,
             executor: str, address: str | None, as_json: bool) -> None:
    """Train a new expert for a task (or several, in parallel); other experts are never touched.

    \b
    Example: clipzoo add-task --zoo myzoo --name mnist --data data/mnist --epochs 30
    Example: clipzoo add-task --zoo myzoo --name cifar --data data/cifar10 --kind lora+prompt \\
               --set lora.rank=4 --set lora.blocks=[1,2] --set expert.kl_weight=1.0
    Compose existing experts (trains only a fusion layer and a head):
      clipzoo add-task --zoo myzoo --name flowers --data data/flowers --kind fusion --from mnist,cifar
    Several tasks at once (named after their folders; each committed on its own):
      clipzoo add-task --zoo myzoo --data data/mnist --data data/gtsrb --data data/dtd --workers 2
      clipzoo add-task --zoo myzoo --data /shared/data/mnist --data /shared/data/dtd --executor ray --address auto
    """
    from clipzoo.zoo.experts import parse_settings
    from clipzoo.zoo.train import TrainSettings, train_defaults
    from clipzoo.zoo.zoo import Zoo

    task_names = _task_names(names, data)
    if address and executor != "ray":
        raise ConfigError("--address needs --executor ray")
    z = Zoo.open(zoo_dir)
    defaults = train_defaults(kind)
    epochs = defaults["epochs"] if epochs is None else epochs
    lr = defaults["lr"] if lr is None else lr
    job = {"kind": kind, "settings": parse_settings(set_), "train": {"epochs": epochs, "lr": lr, "seed": seed},
           "sources": [s.strip() for s in sources.split(",") if s.strip()] if sources else None}
    if len(data) > 1 or executor == "ray":
        outcomes = z.add_tasks([{**job, "name": n, "data": d} for n, d in zip(task_names, data)],
                               executor=executor, workers=workers, address=address)
        _emit_many(outcomes, as_json)
        return
    rec = z.add_task(data[0], name=task_names[0], kind=kind, settings=job["settings"],
                     train=TrainSettings(**job["train"]), sources=job["sources"])
    emit(rec, as_json, _added(rec))


def _added(rec: dict) -> str:
    m = rec["metrics"]
    return (f"added {rec['name']} ({rec['kind']}, {len(rec['classes'])} classes, {rec['trainable_params']:,} trainable "
            f"params = {100 * rec['trainable_share']:.2f}% of the backbone) in {m['add_seconds']:.1f}s; "
            f"test acc {m.get('test_acc', float('nan')):.3f} (zero-shot {m.get('zero_shot_acc', float('nan')):.3f})")


def _emit_many(outcomes: list[dict], as_json: bool) -> None:
    """Each task's outcome (JSON: ``{"ok", "tasks": [...]}``); the failed ones as ``error:`` lines
    on stderr and exit status 1, after the others were committed."""
    failed = [o for o in outcomes if not o["ok"]]
    emit({"ok": not failed, "tasks": outcomes}, as_json,
         "\n".join(_added(o["record"]) for o in outcomes if o["ok"]) or "(no task added)")
    for o in failed:
        click.echo(f"error: task {o['name']}: {o['error']}", err=True)
    if failed:
        sys.exit(1)


@click.command("list")
@existing_zoo_option
@json_option
def list_(zoo_dir: str, as_json: bool) -> None:
    """List the zoo's experts."""
    from clipzoo.zoo import registry  # the registry alone: no model, no torch

    recs = [dict(rec) for rec in registry.read(Path(zoo_dir))["experts"].values()]
    lines = [f"{r['name']:<20} {r['kind']:<16} {len(r['classes']):>3} classes  {r['trainable_params']:>9,} params  "
             f"test acc {r['metrics'].get('test_acc', float('nan')):.3f}  {r['sha256'][:12]}" for r in recs]
    emit(recs, as_json, "\n".join(lines) or "(no experts)")


@click.command()
@existing_zoo_option
@click.option("--name", required=True)
@click.option("--cascade", is_flag=True, help="Also remove the fusion experts composed from it.")
@json_option
def remove(zoo_dir: str, name: str, cascade: bool, as_json: bool) -> None:
    """Remove an expert (and its files) from the zoo.

    \b
    Example: clipzoo remove --zoo myzoo --name mnist --cascade
    """
    from clipzoo.zoo.commit import remove as remove_expert  # no torch, no model: numpy arrays at most

    users = remove_expert(Path(zoo_dir), name, cascade=cascade)[0][:-1]
    also = f" and the fusion experts composed from it: {', '.join(users)}" if users else ""
    emit({"removed": name, "cascaded": users}, as_json, f"removed {name}{also}")


@click.command()
@existing_zoo_option
@json_option
def verify(zoo_dir: str, as_json: bool) -> None:
    """Recompute every file's sha256; exit 1 on any mismatch."""
    from clipzoo.zoo.quick_verify import light_verify

    rep = light_verify(Path(zoo_dir))
    if rep is None:  # something is off: the full check (torch) names each problem
        from clipzoo.zoo.zoo import Zoo

        rep = Zoo.open(zoo_dir).verify()
    emit(rep, as_json, "ok: all hashes match" if rep["ok"] else "FAILED:\n" + "\n".join(rep["problems"]))
    if not rep["ok"]:
        sys.exit(1)


@click.command("router")
@existing_zoo_option
@click.option("--kind", type=click.Choice(["ranpac", "learned", "nearest-stats"]), default=None,
              help="Switch the routing policy (rebuilds the router from the stored statistics); ranpac is "
                   "the default of a new zoo.")
@click.option("--ood-quantile", default=None, type=float, callback=fraction,
              help="In-distribution quantile that sets the zero-shot fallback threshold (e.g. 0.99).")
@click.option("--rebuild", is_flag=True, help="Rebuild the router from every task's statistics.")
@json_option
def router_cmd(zoo_dir: str, kind: str | None, ood_quantile: float | None, rebuild: bool, as_json: bool) -> None:
    """Show the zoo's router, or change it (a new router version; experts are never touched).

    \b
    Example: clipzoo router --zoo myzoo
             clipzoo router --zoo myzoo --kind nearest-stats --ood-quantile 0.995
    """
    from clipzoo.zoo import registry

    if kind or ood_quantile is not None or rebuild:
        from clipzoo.zoo.zoo import Zoo

        z = Zoo.open(zoo_dir)
        z.refresh_router(kind=kind, ood_quantile=ood_quantile)
        reg = z.registry
    else:  # showing needs the registry alone
        reg = registry.read(Path(zoo_dir))
    spec, names = dict(reg["router"]), list(reg["experts"])
    info = {**spec, "experts": names}
    text = (f"router {spec['kind']} v{spec['version']} over {len(names)} experts"
            f" ({', '.join(names) or 'none'}); files: {', '.join(sorted(spec['files'])) or 'none'}")
    emit(info, as_json, text)
