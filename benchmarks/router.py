"""Router benchmark (``clipzoo bench-router``): how close routed answers come to knowing the task.

Three parts, each optional:

- **sequence** (per seed): tasks are learned one after another in a real zoo (``Zoo.add_task`` on
  each task's training split less a validation split carved from it). After each step the mixed
  stream of every seen task's images is routed by each router (``ranpac``, the zoo's default;
  ``learned``, the gate updated without old images; ``nearest-stats``): routing accuracy and
  task-agnostic accuracy (right task and right class), against the same experts given the task
  id (oracle). Answers are scored two ways: the routed expert alone, and the zoo's answer (the
  expert plus the ranpac class posterior within the task, :mod:`clipzoo.router.ranpac`); the
  oracle likewise. The ``slda`` baseline (training-free LDA over all seen classes in CLIP space)
  runs on the same features. After the last step, a small grid of ranpac settings is scored on
  the validation split (the choice) and on test (the report): the shared covariance's shrinkage,
the class head's weight in the answer and its shrinkage. Figures are given for the
  validation and the test split; only validation figures choose anything.
- **lodo**: leave-one-domain-out OOD over the given domains, each held out once (statistics only,
  no experts): AUROC of the calibrated score, fallback on the held-out domain and false fallback
  on the known ones at the quantile given, per domain, mean and worst.
- **scale**: router update time per added task up to N synthetic tasks (random Gaussian class
  clusters in the backbone's feature space, statistics computed as for real tasks; not images).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from clipzoo.bench.slda import SLDA
from clipzoo.errors import ConfigError
from clipzoo.router.gate import NearestStatsRouter
from clipzoo.router.learned import RouterConfig, SparseRouter
from clipzoo.router.ood import DEFAULT_QUANTILE, detector_from_stats
from clipzoo.router.ranpac import RanpacConfig, RanpacRouter
from clipzoo.router.stats import compute_stats
from clipzoo.runtime import progress_bar
from clipzoo.tasks.data import load_task
from clipzoo.tasks.spec import TaskData
from clipzoo.tasks.validation import DEFAULT_FRACTION, validation_split
from clipzoo.zoo.backbone import BackboneSpec
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

GRID = {"shrinkage": (1e-3, 1e-2, 1e-1), "answer_weight": (0.0, 0.25, 0.5, 1.0), "head_shrinkage": (0.1, 0.3, 0.5)}


@dataclass
class RouterBenchSettings:
    epochs: int = 20
    seed: int = 0                # first seed; seeds seed, seed+1, ... train every expert
    seeds: int = 1
    val_fraction: float = DEFAULT_FRACTION
    ood_quantile: float = DEFAULT_QUANTILE
    threads: int = 1             # torch threads for the whole run (timings on a shared machine)


def _acc(ok: torch.Tensor) -> float:
    return round(float(ok.float().mean()), 6) if len(ok) else 0.0


def _auroc(is_ood: torch.Tensor, score: torch.Tensor) -> float:
    return round(float(roc_auc_score(is_ood.numpy(), score.double().numpy())), 6)


def _stream(data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and true task index of every seen task's images, in one pile."""
    return (torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]),
            torch.cat([torch.full((len(y),), j) for j, (_, y) in enumerate(data)]))


def score_routers(zoo: Zoo, routers: dict, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Routing and task-agnostic accuracy of each router, expert alone and (ranpac) with the class
    posterior, against the oracle, with the worst per-task drop from routing."""
    x, y, true = _stream(data)
    with torch.no_grad():
        logp = [zoo.expert(n)(x).log_softmax(1) for n in zoo.names]

    def answers(extra: Mapping | None, w: float, task: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(task), dtype=torch.long)
        for e in task.unique().tolist():
            idx = (task == e).nonzero()[:, 0]
            out[idx] = (logp[e][idx] + (w * extra[zoo.names[e]][idx] if extra else 0)).argmax(1)
        return out

    def per_task(ok: torch.Tensor) -> list[float]:
        return [_acc(ok[true == j]) for j in range(len(data))]

    oracle = answers(None, 0.0, true) == y
    out: dict = {"n": len(y), "oracle_expert_acc": _acc(oracle)}
    for name, r in routers.items():
        route = r.route(x)
        chosen = torch.tensor([zoo.names.index(r.names[int(k)]) for k in route.indices[:, 0]])
        routed = chosen == true
        m = {"routing_acc": _acc(routed), "expert_acc": _acc(routed & (answers(None, 0.0, chosen) == y))}
        if route.class_logp is not None:
            w = route.answer_weight
            ok, ora = routed & (answers(route.class_logp, w, chosen) == y), answers(route.class_logp, w, true) == y
            m.update(answer_acc=_acc(ok), oracle_answer_acc=_acc(ora), answer_weight=w,
                     worst_task_drop=round(max(a - b for a, b in zip(per_task(ora), per_task(ok))), 6))
        else:
            ok = routed & (answers(None, 0.0, chosen) == y)
            m["worst_task_drop"] = round(max(a - b for a, b in zip(per_task(oracle), per_task(ok))), 6)
        m["ratio_to_oracle"] = round(m.get("answer_acc", m["expert_acc"]) / max(m.get("oracle_answer_acc",
                                                                                       out["oracle_expert_acc"]), 1e-9), 6)
        out[name] = m
    return out


def _slda_acc(tasks: list[TaskData], train: list, data: list, zoo: Zoo) -> float:
    """``slda`` (CLIP space, default shrinkage) over every task's classes, task-agnostic."""
    bb = zoo.backbone
    m = SLDA([bb.class_embeddings(t.classes, t.templates) for t in tasks], bb.logit_scale)
    for t, (x, y) in enumerate(train):
        m.learn(t, x, y)
    x, y, true = _stream(data)
    bt, bc = m.agnostic(x, list(range(len(tasks))))
    return _acc((bt == true) & (bc == y))


def sequence_bench(tasks: list[TaskData], s: RouterBenchSettings, zoo_dir: Path, seed: int) -> dict:
    """Learn ``tasks`` in order with experts of ``seed``; per step, every router on the seen tasks."""
    parts = [validation_split(t, s.val_fraction) for t in tasks]
    zoo = Zoo.create(zoo_dir)
    feats = {split: [] for split in ("train", "val", "test")}
    learned: SparseRouter | None = None
    steps = []
    for i, (task, (tr, va)) in enumerate(progress_bar(list(zip(tasks, parts)), desc=f"router bench seed {seed}")):
        zoo.add_task(tr, name=task.name, train=TrainSettings(epochs=s.epochs, seed=seed))
        for split, images, labels in (("train", tr.train.images, tr.train.labels),
                                      ("val", va.test.images, va.test.labels), ("test", task.test.images, task.test.labels)):
            feats[split].append((zoo.features(images, f"encode {task.name}/{split}"), torch.tensor(labels)))
        stats = {n: zoo.stats(n) for n in zoo.names}
        t0 = time.perf_counter()
        learned = learned or SparseRouter(zoo.backbone.embed_dim, RouterConfig(seed=seed), s.ood_quantile)
        learned.add(task.name, stats[task.name])
        learned_seconds = time.perf_counter() - t0
        routers = {"ranpac": zoo.router(), "learned": learned, "nearest-stats": NearestStatsRouter(stats, s.ood_quantile)}
        steps.append({"step": i, "task": task.name, "experts": i + 1,
                      "router_update_seconds": {"ranpac": zoo.router().info.get("update_seconds"),
                                                "learned": round(learned_seconds, 4)},
                      "test": score_routers(zoo, routers, feats["test"])})
    last = steps[-1]
    last["val"] = score_routers(zoo, {"ranpac": zoo.router(), "learned": learned}, feats["val"])
    stats = {n: zoo.stats(n) for n in zoo.names}
    grid = []
    for cfg in (RanpacConfig(shrinkage=a, answer_weight=w, head_shrinkage=h) for a in GRID["shrinkage"]
                for w in GRID["answer_weight"] for h in GRID["head_shrinkage"]):
        r = RanpacRouter.from_stats(stats, cfg, s.ood_quantile)
        grid.append({**asdict(cfg), **{split: score_routers(zoo, {"r": r}, feats[split])["r"]["answer_acc"]
                                       for split in ("val", "test")}})
    best = max(grid, key=lambda g: g["val"])
    return {"seed": seed, "tasks": [t.name for t in tasks], "per_step": steps, "grid": grid,
            "chosen_on_validation": {k: best[k] for k in GRID},
            "slda_acc": {"val": _slda_acc(tasks, feats["train"], feats["val"], zoo),
                         "test": _slda_acc(tasks, feats["train"], feats["test"], zoo)},
            "stored_floats_per_task": {n: sum(v.numel() for v in vars(st).values() if isinstance(v, torch.Tensor))
                                       for n, st in stats.items()},
            "router_config": asdict(zoo.router().config)}


def lodo_bench(tasks: list[TaskData], s: RouterBenchSettings, zoo: Zoo) -> dict:
    """Leave-one-domain-out OOD: each domain held out once from statistics of the others (each
    domain's statistics from its training split less the validation split, as a zoo keeps)."""
    enc = []
    for t in tasks:
        tr = validation_split(t, s.val_fraction)[0]
        enc.append((zoo.features(tr.train.images, f"encode {t.name}/train"), torch.tensor(tr.train.labels),
                    zoo.features(t.test.images, f"encode {t.name}/test")))
    stats = [compute_stats(x, y, len(t.classes)) for t, (x, y, _) in zip(tasks, enc)]
    rows = {}
    for h, held in enumerate(tasks):
        known = [j for j in range(len(tasks)) if j != h]
        det = detector_from_stats([stats[j] for j in known], s.ood_quantile)
        x_in = torch.cat([enc[j][2] for j in known])
        x_out = enc[h][2]
        sc_in, sc_out = det.score(x_in), det.score(x_out)
        rows[held.name] = {"auroc": _auroc(torch.cat([torch.zeros(len(x_in)), torch.ones(len(x_out))]),
                                           torch.cat([sc_in, sc_out])),
                           "fallback_on_heldout": _acc(sc_out > 0), "false_fallback_on_known": _acc(sc_in > 0)}
    keys = ("auroc", "fallback_on_heldout", "false_fallback_on_known")
    return {"ood_quantile": s.ood_quantile, "per_heldout_domain": rows,
            "mean": {k: round(statistics.mean(r[k] for r in rows.values()), 6) for k in keys},
            "worst": {"auroc": min(r["auroc"] for r in rows.values()),
                      "fallback_on_heldout": min(r["fallback_on_heldout"] for r in rows.values()),
                      "false_fallback_on_known": max(r["false_fallback_on_known"] for r in rows.values())}}


def _synthetic_stats(n: int, dim: int, seed: int, classes: int = 10, per_class: int = 30) -> list:
    """``n`` synthetic tasks: random Gaussian class clusters on the unit sphere, their statistics
    computed by :func:`compute_stats` exactly as for real features. Returns ``(stats, test features)``
    per task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        centre = F.normalize(torch.randn(dim, generator=g), dim=0)
        means = centre + 0.6 * F.normalize(torch.randn(classes, dim, generator=g), dim=1)
        y = torch.arange(classes).repeat_interleave(per_class)
        feats = F.normalize(means[y] + 0.6 / dim ** 0.5 * torch.randn(len(y), dim, generator=g), dim=1)
        y_test = torch.arange(classes).repeat(8)
        test = F.normalize(means[y_test] + 0.6 / dim ** 0.5 * torch.randn(len(y_test), dim, generator=g), dim=1)
        out.append((compute_stats(feats, y, classes), test))
    return out


def scale_bench(n: int, dim: int = 64, seed: int = 0) -> dict:
    """Update cost (wall and CPU seconds) per added task of the ranpac and learned routers, 1..n
    synthetic tasks."""
    if n < 2:
        raise ConfigError("--scale needs at least 2 tasks")
    tasks = _synthetic_stats(n, dim, seed)
    routers = {"ranpac": RanpacRouter(dim), "learned": SparseRouter(dim, RouterConfig(seed=seed))}
    rows = []
    for i, (stats, _) in enumerate(progress_bar(tasks, desc="router scale")):
        row = {"experts": i + 1}
        for name, r in routers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            r.add(f"synthetic-{i:03d}", stats)
            row[f"{name}_update_seconds"] = round(time.perf_counter() - w0, 4)
            row[f"{name}_update_cpu_seconds"] = round(time.process_time() - c0, 4)
        rows.append(row)
    x = torch.cat([t for _, t in tasks])
    y = torch.arange(n).repeat_interleave(len(tasks[0][1]))
    q = max(1, (n - 1) // 4)
    out = {"synthetic": f"{n} tasks of 10 random Gaussian class clusters in {dim}-d (not images)",
           "per_added_task": rows, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for name, r in routers.items():
        warm = [row[f"{name}_update_seconds"] for row in rows[1:]]
        out[name] = {"routing_acc_final": _acc(r.route(x).indices[:, 0] == y),
                     "mean_update_seconds_first_quarter": round(sum(warm[:q]) / q, 4),
                     "mean_update_seconds_last_quarter": round(sum(warm[-q:]) / q, 4)}
    return out


def _summary(seqs: list[dict]) -> dict:
    """Mean and std over seeds of the last step's figures (test and validation)."""
    def ms(vals: list[float]) -> dict:
        return {"mean": round(statistics.mean(vals), 6), "std": round(statistics.stdev(vals), 6) if len(vals) > 1 else 0.0}

    out: dict = {"seeds": [q["seed"] for q in seqs]}
    for split in ("test", "val"):
        last = [q["per_step"][-1][split] for q in seqs]
        out[split] = {"oracle_expert_acc": ms([r["oracle_expert_acc"] for r in last]),
                      "slda_acc": ms([q["slda_acc"][split] for q in seqs])}
        for router in (k for k in last[0] if isinstance(last[0][k], dict)):
            out[split][router] = {k: ms([r[router][k] for r in last]) for k, v in last[0][router].items()
                                  if isinstance(v, float) and k != "answer_weight"}
    return out


def run_router_bench(domains: list[str], lodo: bool = False, scale: int = 0,
                     settings: RouterBenchSettings = RouterBenchSettings(), out: Path | None = None) -> dict:
    """The whole benchmark; writes ``router-bench.json`` under ``out`` when given."""
    if domains and len(domains) < 2:
        raise ConfigError("the sequence benchmark needs at least 2 domains (DIRs or builtin:<domain>)")
    if lodo and len(domains) < 3:
        raise ConfigError("--lodo needs at least 3 domains (one held out, two known)")
    if not domains and not scale:
        raise ConfigError("nothing to run: give DOMAINS (and --lodo) and/or --scale N")
    result: dict = {"settings": asdict(settings), "backbone": BackboneSpec().to_dict(), "task_ids_at_test": False}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        if domains:
            tasks = [load_task(d) for d in domains]
            seqs = []
            for seed in range(settings.seed, settings.seed + settings.seeds):
                zoo_dir = Path(tempfile.mkdtemp(prefix="clipzoo-router-bench-")) / "zoo"
                try:
                    seqs.append(sequence_bench(tasks, settings, zoo_dir, seed))
                finally:
                    shutil.rmtree(zoo_dir.parent, ignore_errors=True)
            result["sequence"], result["summary"] = seqs, _summary(seqs)
            if lodo:
                zoo_dir = Path(tempfile.mkdtemp(prefix="clipzoo-router-bench-")) / "zoo"
                try:
                    result["lodo"] = lodo_bench(tasks, settings, Zoo.create(zoo_dir))
                finally:
                    shutil.rmtree(zoo_dir.parent, ignore_errors=True)
        if scale:
            result["scale"] = scale_bench(scale, seed=settings.seed)
    finally:
        torch.set_num_threads(prev_threads)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "router-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_text(res: dict) -> str:
    """A short plain-text table of the results."""
    lines = []
    sm = res.get("summary")
    if sm:
        for split in ("test", "val"):
            t = sm[split]
            lines.append(f"{split} (seeds {sm['seeds']}): oracle (expert alone) {t['oracle_expert_acc']['mean']:.3f}, "
                         f"slda {t['slda_acc']['mean']:.3f} +- {t['slda_acc']['std']:.3f}")
            for router, m in ((k, v) for k, v in t.items() if k not in ("oracle_expert_acc", "slda_acc")):
                cells = ", ".join(f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in m.items())
                lines.append(f"  {router}: {cells}")
        for q in res["sequence"]:
            lines.append(f"seed {q['seed']}: ranpac settings chosen on validation {q['chosen_on_validation']}")
    lo = res.get("lodo")
    if lo:
        lines.append(f"leave-one-domain-out OOD (quantile {lo['ood_quantile']}): mean {lo['mean']}, worst {lo['worst']}")
        for d, r in lo["per_heldout_domain"].items():
            lines.append(f"  {d}: {r}")
    sc = res.get("scale")
    if sc:
        for name in ("ranpac", "learned"):
            lines.append(f"scale ({sc['synthetic']}) {name}: update seconds first quarter "
                         f"{sc[name]['mean_update_seconds_first_quarter']}, last quarter "
                         f"{sc[name]['mean_update_seconds_last_quarter']}, final routing acc "
                         f"{sc[name]['routing_acc_final']:.3f}")
    return "\n".join(lines)
