"""What grows with the zoo, for ``clipzoo bench-cost`` (:mod:`clipzoo.bench.cost`): adding an expert
with cached features at #2 and #N, routing + expert cost per image at 1 and N-1 experts (on the
embedded backbone and at 512-d features; the whole probe and smaller mixed batches of it), and
bytes per expert on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
from pathlib import Path

import torch

from clipzoo.bench.timing import alternating
from clipzoo.tasks.data import load_builtin
from clipzoo.tasks.sequence import class_pair_tasks
from clipzoo.tasks.synthetic import DOMAINS
from clipzoo.zoo.backbone import ASSETS, TINY_MODEL, BackboneSpec
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo


def _route_pair(one, many, feats: torch.Tensor, calls: int = 20) -> tuple[float, float]:
    """Milliseconds per image of routing + the chosen experts (top-1, no fallback), warm, on zoo
    ``one`` and zoo ``many``: their calls alternate (:func:`clipzoo.bench.timing.alternating`), and
    each side keeps its best of ``calls`` (the machine is shared; the least disturbed call is the cost)."""
    t_one, t_many = alternating([lambda: one.predict_features(feats, fallback=False),
                                 lambda: many.predict_features(feats, fallback=False)], calls)
    return 1000 * min(t_one) / len(feats), 1000 * min(t_many) / len(feats)


def _timed_add(src: Path, dest: Path, task, train) -> dict:
    """Add ``task`` to a fresh copy of the zoo ``src`` (backbone loaded first, the copy on disk): its metrics."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    os.sync()  # the copy's dirty pages written now: the add's own fsyncs would otherwise flush them
    zoo = Zoo.open(dest)
    zoo.backbone  # the model is loaded once per process: not part of what is compared
    m = zoo.add_task(task, train=train)["metrics"]
    return {k: m.get(k) for k in ("add_seconds", "train_seconds", "router_seconds")}


def _filled_zoo(root: Path, experts: int, n_train: int, backbone: BackboneSpec = BackboneSpec()) -> dict:
    """A zoo of ``experts - 1`` distinct two-class tasks cut from the built-in domains (each
    trained one epoch, every feature cached first) and a copy holding the first alone: the
    domains, the tasks (the last one left out), both zoos and the probe (every domain's test
    images, so it is routed over many experts)."""
    domains = [load_builtin(d, n_train=n_train) for d in DOMAINS]
    tasks = class_pair_tasks(domains, experts)
    z = Zoo.create(root / "zoo-n", backbone)
    probe = torch.cat([z.features(t.test.images) for t in domains])  # every feature cached now
    for t in domains:
        z.features(t.train.images)
    for i, t in enumerate(tasks[:-1]):
        z.add_task(t, train=TrainSettings(epochs=1))
        if i == 0:
            shutil.copytree(z.root, root / "zoo-1")
    return {"domains": domains, "tasks": tasks, "one": Zoo.open(root / "zoo-1"), "zoo": z, "probe": probe}


# smaller routed batches beside the whole probe: a single client's few images, a server micro-batch
BATCHES = (8, 32)


def _probe_batches(probe: torch.Tensor, sizes: tuple[int, ...] = BATCHES, seed: int = 0) -> dict[int, torch.Tensor]:
    """The whole probe and, for each of ``sizes`` below its length, a fixed random draw of that
    many of its images (mixed domains, as a client's batch would be): batch size -> features."""
    order = torch.randperm(len(probe), generator=torch.Generator().manual_seed(seed))
    return {**{n: probe[order[:n]] for n in sizes if n < len(probe)}, len(probe): probe}


def _route_rows(pairs: dict[int, list[tuple[float, float]]], batches: dict[int, torch.Tensor], zoo) -> dict:
    """The per-image routing figures of :func:`_route_pair` (one pair per repeat and batch size):
    for the whole probe, medians of each side, the median and range of the per-repeat ratios and
    how many experts it reaches; the same for each smaller batch under ``by_batch``."""
    def rows(n: int) -> dict:
        ratios = [b / a for a, b in pairs[n]]
        return {"distinct_experts": len(set(zoo.route(batches[n]).indices[:, 0].tolist())),
                "route_ms_per_image": {"experts_1": round(statistics.median(a for a, _ in pairs[n]), 4),
                                       f"experts_{len(zoo.names)}": round(statistics.median(b for _, b in pairs[n]), 4)},
                "ratio_route_last_vs_1": round(statistics.median(ratios), 2),
                "ratio_route_range": [round(min(ratios), 2), round(max(ratios), 2)]}

    whole = max(batches)
    top = rows(whole)
    return {"probe_images": whole, "probe_distinct_experts": top.pop("distinct_experts"), **top,
            "by_batch": {str(n): rows(n) for n in sorted(batches) if n != whole}}


def _route_repeat(one, many, batches: dict[int, torch.Tensor], pairs: dict[int, list]) -> None:
    """One repeat of :func:`_route_pair` at every batch size, appended to ``pairs``."""
    for n, feats in batches.items():
        pairs.setdefault(n, []).append(_route_pair(one, many, feats))


def add_and_route(root: Path, experts: int, epochs: int, repeats: int = 5, n_train: int = 300) -> dict:
    """Add-task cost with cached features at expert #2 and #``experts``, and routing + expert cost
    per image at 1 and at ``experts - 1`` experts, on the embedded backbone. The two sizes are
    measured in turn, ``repeats`` times each (every add on a fresh copy of the zoo): medians of
    each figure, and of each repeat's ratio with its range, so that a machine whose load drifts
    weighs on both sides alike."""
    # by default 300 training images per class, as in the shared real data sets
    filled = _filled_zoo(root, experts, n_train)
    z, one, probe = filled["zoo"], filled["one"], filled["probe"]
    # the timed adds: a whole domain (the last, as task "added") and the 2-class task left out of the fill
    added = {"": dataclasses.replace(filled["domains"][-1], name="added"), "_small": filled["tasks"][-1]}
    timed = TrainSettings(epochs=epochs)
    adds: dict[str, list[dict]] = {f"expert_{n}{tag}": [] for tag in added for n in (2, experts)}
    batches, route = _probe_batches(probe), {}
    for _ in range(repeats):
        for tag, task in added.items():  # the same task as expert #2 and as expert #N
            adds[f"expert_2{tag}"].append(_timed_add(root / "zoo-1", root / "zoo-add", task, timed))
            adds[f"expert_{experts}{tag}"].append(_timed_add(z.root, root / "zoo-add", task, timed))
        _route_repeat(one, z, batches, route)
    med = {k: {f: round(statistics.median(a[f] for a in v), 3) for f in v[0]} for k, v in adds.items()}
    for a in med.values():
        a["router_share"] = round(a["router_seconds"] / a["add_seconds"], 3)
    out = {"experts": experts, "epochs": epochs, "repeats": repeats, "adds": med,
           "added_tasks": {tag or "_domain": {"name": t.name, "classes": len(t.classes), "train_images": len(t.train)}
                           for tag, t in added.items()}}
    for tag in added:  # the ratio of each repeat's two adds, made one after the other
        first, last = f"expert_2{tag}", f"expert_{experts}{tag}"
        ratios = [b["add_seconds"] / a["add_seconds"] for a, b in zip(adds[first], adds[last])]
        out[f"ratio_add_last_vs_2{tag}"] = round(statistics.median(ratios), 2)
        out[f"ratio_add_range{tag}"] = [round(min(ratios), 2), round(max(ratios), 2)]
        out[f"router_share_max{tag}"] = max(med[first]["router_share"], med[last]["router_share"])
    return {**out, **_route_rows(route, batches, z),
            "bytes_per_expert_embedded": zoo_bytes_per_expert(z.root, len(z.names)),
            "zoo": z.root}


def wide_backbone(folder: Path, dim: int) -> BackboneSpec:
    """The embedded model's towers with a ``dim``-d joint embedding (open_clip config registered
    in this process), random weights saved to a local file: the features, routers and experts of
    a ``dim``-d CLIP (ViT-B-32's width at 512) without its cost to encode."""
    import open_clip
    from safetensors.torch import save_file

    name = f"{TINY_MODEL}-{dim}d"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**json.loads((ASSETS / f"{TINY_MODEL}.json").read_text()), "embed_dim": dim}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    return BackboneSpec(name, str(folder / f"{name}.safetensors"))


def route_at_width(root: Path, dim: int, experts: int, repeats: int = 3, n_train: int = 100) -> dict:
    """Routing + expert cost per image at 1 and ``experts - 1`` experts on ``dim``-d features
    (:func:`wide_backbone`), ``repeats`` times (:func:`_route_rows`): what grows with the
    experts a batch reaches (each one's adapter weights and whitening map, ``D x D``) weighs far
    more at ViT-B-32's width than at the embedded model's."""
    filled = _filled_zoo(root, experts, n_train, wide_backbone(root / "backbone", dim))
    batches, route = _probe_batches(filled["probe"]), {}
    for _ in range(repeats):
        _route_repeat(filled["one"], filled["zoo"], batches, route)
    return {"dim": dim, "experts": experts, "train_images_per_class": n_train, **_route_rows(route, batches, filled["zoo"])}


def zoo_bytes_per_expert(root: Path, n: int) -> dict:
    """Bytes on disk per expert: expert folders (weights, config, stats) and router files, over ``n``."""
    experts = sum(p.stat().st_size for p in (root / "experts").rglob("*") if p.is_file())
    router = sum(p.stat().st_size for p in (root / "router").glob("router-v*")) if (root / "router").is_dir() else 0
    stats = sum(p.stat().st_size for p in (root / "experts").glob("*/stats.safetensors"))
    return {"total": round((experts + router) / n), "stats": round(stats / n), "router": round(router / n),
            "router_versions_on_disk": len(list((root / "router").glob("router-v*.safetensors")))}


def vit_bytes_per_expert(root: Path, dim: int = 512, tasks: int = 8, versions: int = 1) -> dict:
    """Statistics + router bytes per expert for ``dim``-d features (synthetic statistics, as
    computed for real ones) under the default router, with ``versions`` router versions on disk (the
    expert's own weights, which depend on its kind, are not included). The ranpac router's file
    holds a fixed-size scatter sum, so its share per expert falls as the zoo grows."""
    from clipzoo.bench.router import _synthetic_stats
    from clipzoo.router.ranpac import RanpacRouter

    stats = {f"s{i}": s for i, (s, _) in enumerate(_synthetic_stats(tasks, dim, seed=0, per_class=12))}
    folder = root / f"vit-{dim}-{tasks}"
    folder.mkdir(parents=True)
    per_stats = []
    for name, s in stats.items():
        (folder / name).mkdir()
        per_stats.append((folder / name / s.save(folder / name)).stat().st_size)
    r = RanpacRouter.from_stats(stats)
    router = sum((folder / f).stat().st_size for f in r.save(folder, "router-v1"))
    st = sum(per_stats) / tasks
    return {"dim": dim, "tasks": tasks, "router_kind": "ranpac", "stats": round(st), "router": round(router / tasks),
            "router_versions": versions, "total": round(st + versions * router / tasks)}
