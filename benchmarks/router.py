"""Router benchmark (``clipzoo bench-router``): the learned gate against nearest-statistics routing.

Three parts, each optional:

- **sequence**: tasks are learned one after another in a real zoo (``Zoo.add_task``, learned
  router updated without old images). After each step, the mixed stream of every seen task's test
  images is routed by each router: routing accuracy, task-agnostic accuracy (right task and right
  class, top-1 expert) and oracle accuracy (task given), with their change since the previous step.
  Routers: ``learned`` (the zoo's, warm-started at each add), ``learned-cold`` (retrained from all
  stats at each step: what warm-starting should match), ``nearest-stats`` (the foundation's), and
  ``learned+exemplars`` when an exemplar budget is given.
- **holdout**: one more domain, never learned, mixed into the stream: OOD AUROC of the calibrated
  score (and of simpler scores for comparison), fallback rate on it, false-fallback rate on known
  domains, and zero-shot accuracy of the fallback answers given the held-out domain's class names.
- **scale**: router update time per added task up to N synthetic tasks (random Gaussian class
  clusters in the backbone's feature space, statistics computed as for real tasks; not images).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from clipzoo.runtime import progress_bar

from clipzoo.router.gate import NearestStatsRouter
from clipzoo.router.learned import RouterConfig, SparseRouter
from clipzoo.router.ood import DEFAULT_QUANTILE
from clipzoo.router.stats import compute_stats
from clipzoo.tasks.data import load_task
from clipzoo.tasks.spec import TaskData
from clipzoo.zoo.backbone import BackboneSpec
from clipzoo.errors import ConfigError
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo


@dataclass
class RouterBenchSettings:
    epochs: int = 20
    seed: int = 0
    exemplars: int = 0
    ood_quantile: float = DEFAULT_QUANTILE
    threads: int = 1             # torch threads for the whole run (timings on a shared machine)


def _acc(ok: torch.Tensor) -> float:
    return round(float(ok.float().mean()), 6) if len(ok) else 0.0


def _auroc(is_ood: torch.Tensor, score: torch.Tensor) -> float:
    return round(float(roc_auc_score(is_ood.numpy(), score.double().numpy())), 6)


def sequence_bench(tasks: list[TaskData], holdout: TaskData | None, s: RouterBenchSettings, zoo_dir: Path) -> dict:
    """Learn ``tasks`` in order; per step, every router on the mixed stream of seen test sets."""
    zoo = Zoo.create(zoo_dir)
    zoo.refresh_router(kind="learned", ood_quantile=s.ood_quantile, config=RouterConfig(seed=s.seed))
    test = [(zoo.features(t.test.images, f"encode {t.name}/test"), torch.tensor(t.test.labels))
            for t in tasks]
    ex_router = SparseRouter(zoo.backbone.embed_dim, RouterConfig(exemplars=s.exemplars, seed=s.seed), s.ood_quantile)
    gen = torch.Generator().manual_seed(s.seed)
    steps, prev = [], {}
    for i, task in enumerate(progress_bar(tasks, desc="router bench steps")):
        zoo.add_task(task, train=TrainSettings(epochs=s.epochs, seed=s.seed))
        update = zoo.router().info  # what the incremental update just did (loaded from its file)
        stats = {n: zoo.stats(n) for n in zoo.names}
        routers = {"learned": zoo.router(), "nearest-stats": NearestStatsRouter(stats, s.ood_quantile)}
        t0 = time.perf_counter()
        routers["learned-cold"] = SparseRouter.from_stats(stats, RouterConfig(seed=s.seed), s.ood_quantile)
        cold_seconds = time.perf_counter() - t0
        if s.exemplars:
            ex_router.add(task.name, stats[task.name], zoo.features(task.train.images))
            routers["learned+exemplars"] = ex_router
        # the mixed stream: every seen task's test images, shuffled
        order = torch.randperm(sum(len(test[j][1]) for j in range(i + 1)), generator=gen)
        x = torch.cat([test[j][0] for j in range(i + 1)])[order]
        y = torch.cat([test[j][1] for j in range(i + 1)])[order]
        true_task = torch.cat([torch.full((len(test[j][1]),), j) for j in range(i + 1)])[order]
        label_by_expert = torch.stack([_expert_labels(zoo, n, x) for n in zoo.names])       # (E, N)
        oracle_ok = label_by_expert[true_task, torch.arange(len(y))] == y
        row = {"step": i, "task": task.name, "experts": i + 1, "n_stream": len(y), "oracle_acc": _acc(oracle_ok),
               "router_update_seconds": update.get("update_seconds"), "cold_retrain_seconds": round(cold_seconds, 4)}
        for name, r in routers.items():
            chosen = torch.tensor([zoo.names.index(r.names[int(k)]) for k in r.route(x).indices[:, 0]])
            routed_ok = chosen == true_task
            agnostic_ok = routed_ok & (label_by_expert[chosen, torch.arange(len(y))] == y)
            m = {"routing_acc": _acc(routed_ok), "task_agnostic_acc": _acc(agnostic_ok)}
            m["gap_to_oracle"] = round(row["oracle_acc"] - m["task_agnostic_acc"], 6)
            m.update({f"delta_{k}": round(v - prev[name][k], 6) if name in prev else None for k, v in list(m.items())})
            prev[name] = m
            row[name] = m
        steps.append(row)
    result = {"tasks": [t.name for t in tasks], "per_step": steps, "task_ids_at_test": False,
              "router_config": asdict(zoo.router().config), "exemplars_per_task": s.exemplars}
    if holdout is not None:
        result["holdout"] = holdout_bench(zoo, tasks, test, holdout, s)
    return result


def _expert_labels(zoo: Zoo, name: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return zoo.expert(name)(x).argmax(1)


def holdout_bench(zoo: Zoo, tasks: list[TaskData], test: list[tuple[torch.Tensor, torch.Tensor]], holdout: TaskData,
                  s: RouterBenchSettings) -> dict:
    """OOD detection of a never-learned domain against the known domains' test images."""
    x_id = torch.cat([t[0] for t in test])
    x_ood = zoo.features(holdout.test.images, f"encode {holdout.name}/test")
    x = torch.cat([x_id, x_ood])
    is_ood = torch.cat([torch.zeros(len(x_id)), torch.ones(len(x_ood))])
    learned = zoo.router()
    nearest = NearestStatsRouter({n: zoo.stats(n) for n in zoo.names}, s.ood_quantile)
    logits = learned.logits(x)
    det = learned.ood
    calibrated = det.score(x)
    scores = {"calibrated_class_loglik": calibrated,
              "min_class_mahalanobis_no_logdet": (det.task_scores(x) - det.logdets[None]).min(1).values,
              "nearest_stats_neg_max_loglik": -nearest.scores(x).max(1).values,
              "gate_neg_max_softmax": -logits.softmax(1).max(1).values,
              "gate_neg_energy": -torch.logsumexp(logits, 1)}
    per_domain = {t.name: _acc(det.score(tx) > 0) for t, (tx, _) in zip(tasks, test)}
    rates = {}
    for q in sorted({0.9, 0.95, 0.99, s.ood_quantile}):
        det.q = q
        fell = det.score(x) > 0
        rates[str(q)] = {"fallback_rate_holdout": _acc(fell[len(x_id):]),
                         "false_fallback_rate_known": _acc(fell[:len(x_id)])}
    det.q = s.ood_quantile
    fell_ood = calibrated[len(x_id):] > 0
    y_ood = torch.tensor(holdout.test.labels)
    names, probs = zoo.zero_shot(x_ood, holdout.classes)
    zs_ok = probs.argmax(1) == y_ood
    known_names, known_probs = zoo.zero_shot(x_ood)
    return {
        "domain": holdout.name, "n_known": len(x_id), "n_holdout": len(x_ood), "ood_quantile": s.ood_quantile,
        "auroc": {k: _auroc(is_ood, v) for k, v in scores.items()},
        "rates": rates,
        "false_fallback_rate_per_known_domain": per_domain,
        "zero_shot_acc_on_fallbacks_given_holdout_classes": _acc(zs_ok[fell_ood]),
        "zero_shot_acc_on_all_holdout_given_its_classes": _acc(zs_ok),
        "holdout_answered_right_given_its_classes": _acc(zs_ok & fell_ood),
        "zero_shot_answers_with_all_known_classes": len(known_names),
    }


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
    """Router update cost (wall and CPU seconds) per added task, 1..n synthetic tasks."""
    if n < 2:
        raise ConfigError("--scale needs at least 2 tasks")
    tasks = _synthetic_stats(n, dim, seed)
    r = SparseRouter(dim, RouterConfig(seed=seed))
    rows = []
    for i, (stats, _) in enumerate(progress_bar(tasks, desc="router scale")):
        w0, c0 = time.perf_counter(), time.process_time()
        r.add(f"synthetic-{i:03d}", stats)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        w0 = time.perf_counter()
        NearestStatsRouter({f"s{j}": tasks[j][0] for j in range(i + 1)})
        rows.append({"experts": i + 1, "update_seconds": round(wall, 4), "update_cpu_seconds": round(cpu, 4),
                     "nearest_stats_build_seconds": round(time.perf_counter() - w0, 4)})
    x = torch.cat([t for _, t in tasks])
    y = torch.arange(n).repeat_interleave(len(tasks[0][1]))
    warm = [row["update_seconds"] for row in rows[1:]]
    q = max(1, len(warm) // 4)
    return {"synthetic": f"{n} tasks of 10 random Gaussian class clusters in {dim}-d (not images)",
            "per_added_task": rows, "routing_acc_final": _acc(r.route(x).indices[:, 0] == y),
            "mean_update_seconds_first_quarter": round(sum(warm[:q]) / q, 4),
            "mean_update_seconds_last_quarter": round(sum(warm[-q:]) / q, 4),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def run_router_bench(domains: list[str], holdout: str | None = None, scale: int = 0,
                     settings: RouterBenchSettings = RouterBenchSettings(), out: Path | None = None) -> dict:
    """The whole benchmark; writes ``router-bench.json`` under ``out`` when given."""
    if domains and len(domains) < 2:
        raise ConfigError("the sequence benchmark needs at least 2 domains (DIRs or builtin:<domain>)")
    if holdout and not domains:
        raise ConfigError("--holdout needs the learned DOMAINS too")
    if not domains and not scale:
        raise ConfigError("nothing to run: give DOMAINS (and --holdout DOMAIN) and/or --scale N")
    result: dict = {"settings": asdict(settings), "backbone": BackboneSpec().to_dict()}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        _run_parts(result, domains, holdout, scale, settings)
    finally:
        torch.set_num_threads(prev_threads)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "router-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run_parts(result: dict, domains: list[str], holdout: str | None, scale: int, settings: RouterBenchSettings) -> None:
    """Fill ``result`` with the sequence (+ holdout) and scale parts that were asked for."""
    if domains:
        tasks = [load_task(d) for d in domains]
        zoo_dir = Path(tempfile.mkdtemp(prefix="clipzoo-router-bench-")) / "zoo"
        try:
            result["sequence"] = sequence_bench(tasks, load_task(holdout) if holdout else None, settings, zoo_dir)
        finally:
            shutil.rmtree(zoo_dir.parent, ignore_errors=True)
    if scale:
        result["scale"] = scale_bench(scale, seed=settings.seed)


def summary_text(res: dict) -> str:
    """A short plain-text table of the results."""
    lines = []
    seq = res.get("sequence")
    if seq:
        routers = [k for k in seq["per_step"][-1] if isinstance(seq["per_step"][-1][k], dict)]
        lines.append("step task            oracle  " + "  ".join(f"{r[:16]:>16} route/agn" for r in routers))
        for row in seq["per_step"]:
            cells = "  ".join(f"{row[r]['routing_acc']:>16.3f} / {row[r]['task_agnostic_acc']:.3f}" for r in routers)
            lines.append(f"{row['step']:>4} {row['task'][:15]:<15} {row['oracle_acc']:.3f}   {cells}")
        ho = seq.get("holdout")
        if ho:
            lines.append(f"holdout {ho['domain']}: AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in ho["auroc"].items()))
            for q, r in ho["rates"].items():
                lines.append(f"  q={q}: fallback on holdout {r['fallback_rate_holdout']:.3f}, "
                             f"false fallback on known {r['false_fallback_rate_known']:.3f}")
    sc = res.get("scale")
    if sc:
        lines.append(f"scale ({sc['synthetic']}): update seconds first quarter "
                     f"{sc['mean_update_seconds_first_quarter']}, last quarter "
                     f"{sc['mean_update_seconds_last_quarter']}, final routing acc {sc['routing_acc_final']:.3f}")
    return "\n".join(lines)
