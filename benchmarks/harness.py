"""The forgetting benchmark: train through task sequences and fill each method's accuracy matrix.

For every (order, seed) run the zoo is a real zoo directory grown with ``Zoo.add_task``; the
baselines (:mod:`clipzoo.bench.methods`) run in the same run with the same seed: the shared-adapter ones on
the same cached frozen features, epochs and learning rate, the full-fine-tuning ones
(:mod:`clipzoo.bench.finetune`) on the same images as pixels, after each baseline's own hyper-parameters were chosen on
validation data carved from the first two tasks' training splits (:mod:`clipzoo.bench.tuning`;
test splits only report). Lower-triangle entries (``j <= i``) are task-agnostic but for
the ``zoo-oracle`` row: an answer counts only if it names the right task and the right class. Upper-triangle entries (``j > i``) give the task's class names (zero-shot transfer to a
task not learned yet; a method that cannot score unseen classes, the zoo and ``slda``, answers with frozen
zero-shot CLIP there). Finished steps are checkpointed (:mod:`clipzoo.bench.resume`), so ``resume=True``
continues a crashed run. The result's layout is documented in ``benchmarks/REPORT_SCHEMA.md``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipzoo.bench import baselines as B
from clipzoo.bench import pixels as PX
from clipzoo.bench.methods import (CROSS_CHECKS, FT_METHODS, METHODS, build as _build, check_ft,
                                   exclude as _exclude, inputs as _inputs, on_pixels)
from clipzoo.bench import tuning
from clipzoo.tasks.metrics import METRIC_KEYS, mean_std, seen_accuracy_per_step, summary
from clipzoo.bench.resume import StepStore
from clipzoo.tasks.sequence import task_orders
from clipzoo.tasks.spec import TaskData
from clipzoo.tasks.validation import DEFAULT_SEED as VAL_SEED
from clipzoo.zoo.backbone import Backbone, BackboneSpec, load_backbone
from clipzoo.zoo.cache import backbone_features
from clipzoo.errors import ConfigError
from clipzoo.runtime import progress_bar
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

__all__ = ["BenchSettings", "default_methods", "run_benchmark", "METHODS", "ZOO_ROWS"]

SCHEMA_VERSION = 4
ZOO_ROWS = ("zoo", "zoo-oracle")


def avalanche_available() -> bool:
    """Whether the optional avalanche-lib is installed (``clipzoo[bench]``), without importing it."""
    return importlib.util.find_spec("avalanche") is not None


def default_methods() -> list[str]:
    """Every baseline, plus the avalanche-lib cross-checks when that optional extra is installed."""
    return list(METHODS) + (list(CROSS_CHECKS) if avalanche_available() else [])


@dataclass
class BenchSettings:
    seed: int = 0
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    kind: str = "clip-adapter"
    backbone: str = "clipzoo-tiny"
    pretrained: str | None = "embedded"
    orders: int = 1
    seeds: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ewc_lambda: float = 1e3
    lwf_alpha: float = 1.0
    zscl_beta: float = 1.0
    slda_shrinkage: float = 1e-2
    # the full-fine-tuning baselines (clipzoo.bench.methods.check_ft says what each is)
    ft_lr: float = 1e-4
    ft_steps: int = 20
    ft_batch_size: int = 64
    ft_zscl_weight: float = 1.0
    ft_cite_weight: float = 1.0
    ft_avg_every: int = 5
    ft_ref_per_class: int = 10
    ft_threads: int = 0
    # choose ewc_lambda, lwf_alpha, zscl_beta, slda_shrinkage, ft_lr (on ft-naive, then used by every
    # ft method), ft_zscl_weight and ft_cite_weight on validation data (tuning.GRIDS);
    # False keeps the values above
    tune: bool = True
    val_fraction: float = 0.1  # of each training split, per class, for that choice
    threads: int = 1  # torch threads; tiny feature-space models run fastest (and steadiest) on one
    # the shared-adapter baselines train their heads at the full lr (as avalanche's strategies do;
    # stronger baselines than the experts' 0.1x recipe); the zoo's experts keep TrainSettings' default
    baseline_head_lr_scale: float = 1.0


    def train(self, seed: int | None = None) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                             seed=self.seed if seed is None else seed)

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS + CROSS_CHECKS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}: "
                              f"choose from {', '.join(METHODS + CROSS_CHECKS)}")
        if any(m in CROSS_CHECKS for m in self.methods) and not avalanche_available():
            raise ConfigError("the avalanche-* cross-checks need avalanche-lib: pip install 'clipzoo[bench]'")
        if not 0 < self.val_fraction < 1 or not 0 <= self.slda_shrinkage <= 1:
            raise ConfigError("val_fraction must be in (0, 1) and slda_shrinkage in [0, 1]")
        if min(self.epochs, self.batch_size, self.seeds, self.threads) < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch size, --seeds and --threads must be >= 1 and lr > 0")
        check_ft(self)


def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss; KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1 << 20) if platform.system() == "Darwin" else r / 1024, 1)


def _acc(ok: torch.Tensor) -> float:
    return round(float(ok.float().mean()), 6) if len(ok) else 0.0


def _zoo_params(zoo: Zoo) -> tuple[int, int, int]:
    """(trainable, stored, router) numbers of the zoo: the experts' trainable parameters; everything
    stored (experts' weights, per-task statistics, a learned router's file); the router file's share."""
    trainable = sum(int(r["trainable_params"]) for r in zoo.records())
    files = [f for f in zoo.registry.get("router", {}).get("files", {}) if f.endswith(".safetensors")]
    router = sum(B.numel(load_file(str(zoo.root / f)).values()) for f in files)
    stored = router + sum(B.numel(zoo.expert(n).state_dict().values())
                          + B.numel(v for v in vars(zoo.stats(n)).values() if isinstance(v, torch.Tensor))
                          for n in zoo.names)
    return trainable, stored, router


def _open_zoo(zoo_dir: Path, s: BenchSettings, done: list[str]) -> Zoo:
    """A fresh zoo, or (resuming) the existing one with any expert beyond the finished steps removed."""
    if done and (zoo_dir / "registry.json").is_file():
        zoo = Zoo.open(zoo_dir)
        if set(done) <= set(zoo.names):
            for extra in [n for n in zoo.names if n not in done]:
                zoo.remove(extra)  # trained in a step that crashed before its checkpoint
            return zoo
        raise ConfigError(f"cannot resume: the zoo in {zoo_dir} lacks experts of finished steps; drop --resume")
    shutil.rmtree(zoo_dir, ignore_errors=True)
    return Zoo.create(zoo_dir, BackboneSpec(s.backbone, s.pretrained))


def _evaluate_step(i: int, tasks: list[TaskData], feats: list, zoo: Zoo, methods: list,
                   pix: list | None = None) -> dict:
    """Row ``i`` of every method's matrix, with pooled correct counts over the seen tasks (the
    fine-tuning baselines read the same test images as pixels, ``pix``)."""
    T = len(tasks)
    zs = next(m for m in methods if m.name == "zero-shot")
    rows = {n: [0.0] * T for n in ZOO_ROWS + tuple(m.name for m in methods)}
    pooled = {n: {"agnostic": 0, "given": 0, "n": 0} for n in rows}
    routed_n, fallback_n = 0, 0
    seen = list(range(i + 1))
    for j in range(T):
        x, y = feats[j][2], feats[j][3]
        if j > i:  # not learned yet: transfer, given the task's class names
            rows["zoo"][j] = _acc(_zoo_unseen(zoo, x, tasks[j].classes, y))
            rows["zoo-oracle"][j] = _acc(zs.given(x, j) == y)  # the task id says "not learned": zero-shot
            for m in methods:
                rows[m.name][j] = _acc(m.unseen(_inputs(m, j, feats, pix), j) == y)
            continue
        truth = [tasks[j].classes[int(c)] for c in y]
        preds = zoo.predict_features(x)
        routed = torch.tensor([p["task"] == tasks[j].name for p in preds])
        ok = routed & torch.tensor([p["label"] == t for p, t in zip(preds, truth)])
        oracle = torch.tensor([p["label"] == t for p, t in zip(zoo.predict_features(x, task=tasks[j].name), truth)])
        fallback_n += sum(p["fallback"] for p in preds)
        rows["zoo"][j], rows["zoo-oracle"][j] = _acc(ok), _acc(oracle)
        routed_n += int(routed.sum())
        for name, agn, giv in (("zoo", ok, oracle), ("zoo-oracle", oracle, oracle)):
            pooled[name]["agnostic"] += int(agn.sum())
            pooled[name]["given"] += int(giv.sum())
            pooled[name]["n"] += len(y)
        for m in methods:
            xm = _inputs(m, j, feats, pix)
            bt, bc = m.agnostic(xm, seen)
            agn = (bt == j) & (bc == y)
            rows[m.name][j] = _acc(agn)
            pooled[m.name]["agnostic"] += int(agn.sum())
            pooled[m.name]["given"] += int((m.given(xm, j) == y).sum())
            pooled[m.name]["n"] += len(y)
    n = pooled["zoo"]["n"]
    return {"rows": rows, "pooled": pooled, "routed": routed_n, "n_seen": n,
            "fallback": fallback_n}


def _zoo_unseen(zoo: Zoo, x: torch.Tensor, classes: list[str], y: torch.Tensor) -> torch.Tensor:
    """The zoo's real answers for a task it has not learned, told only that task's class names: an
    image counts when the router falls back and zero-shot CLIP over those names is right (an image
    routed to an expert answers with that expert's classes, so it is wrong)."""
    preds = zoo.predict_features(x, classes=classes)
    return torch.tensor([p["fallback"] and p["label"] == classes[int(c)] for p, c in zip(preds, y)])


def _timed_ms(fn, n: int, repeat: int = 3) -> float:
    """Milliseconds per input: the best of ``repeat`` timed calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best / max(1, n), 4)


def _ood(zoo: Zoo, held: tuple[str, torch.Tensor] | None, last: dict) -> dict:
    """Fallback rate on the held-out domain vs false-fallback rate on the known domains."""
    if held is None:
        return {"holdout": None, "available": False, "reason": "no --holdout domain given"}
    name, x = held
    preds = zoo.predict_features(x)
    routed_to = {n: round(sum(p["task"] == n for p in preds) / len(preds), 6) for n in zoo.names}
    return {"holdout": name, "n": len(preds), "available": True, "routed_to": routed_to,
            "fallback_rate": round(sum(p["fallback"] for p in preds) / len(preds), 6),
            "false_fallback_rate": round(last["fallback"] / max(1, last["n_seen"]), 6)}


def _run(rid: str, order: list[int], seed: int, all_tasks: list[TaskData], all_feats: list, bb: Backbone,
         s: BenchSettings, run_dir: Path, zoo_dir: Path, resume: bool,
         held: tuple[str, torch.Tensor] | None) -> dict:
    tasks = [all_tasks[k] for k in order]
    feats = [all_feats[k] for k in order]
    T = len(tasks)
    embs = [bb.class_embeddings(t.classes, t.templates) for t in tasks]
    train = s.train(seed)
    names = ["zero-shot"] + [m for m in s.methods if m != "zero-shot"]
    torch.manual_seed(seed)  # the baselines' initial weights
    methods = _build(names, embs, bb, replace(train, head_lr_scale=s.baseline_head_lr_scale), s,
                     texts=[(t.classes, t.templates) for t in tasks], excluded=_exclude(all_tasks, held))
    # the fine-tuning baselines read pixels: decoded once per process (clipzoo.bench.pixels), never per step
    pix = [PX.task_pixels(t, bb) for t in tasks] if any(n in FT_METHODS for n in names) else None
    store = StepStore(run_dir / "steps")
    config = {"settings": {k: v for k, v in asdict(s).items() if k not in ("orders", "seeds")}, "seed": seed,
              "tasks": [t.name for t in tasks], "sources": [t.source for t in tasks],
              "sizes": [[len(t.train), len(t.test)] for t in tasks], "backbone_fingerprint": bb.fingerprint}
    start = store.start(config, resume)
    zoo = _open_zoo(zoo_dir, s, [t.name for t in tasks[:start]])
    if start:
        states = store.states(start - 1)
        for m in methods:
            m.restore(states.get(m.name, {}), [(f[0], f[1]) for f in feats[:start]])
    for i in progress_bar(range(start, T), desc=f"run {rid}", initial=start, total=T):
        torch.manual_seed(seed * 1000 + i)  # each step's randomness depends on (seed, step) only: resumable
        t0 = time.perf_counter()
        zoo.add_task(tasks[i], train=train, kind=s.kind)
        learn = {"zoo": round(time.perf_counter() - t0, 3)}
        for m in methods:
            if on_pixels(m):  # frozen features = the teacher's, cached
                learn[m.name] = round(m.learn(i, pix[i][0], pix[i][1], frozen=feats[i][0])["train_seconds"], 3)
            else:
                learn[m.name] = round(m.learn(i, feats[i][0], feats[i][1])["train_seconds"], 3)
        ev = _evaluate_step(i, tasks, feats, zoo, methods, pix)
        store.save(i, {"step": i, "task": tasks[i].name, "train_seconds": learn, **ev},
                   {m.name: m.state() for m in methods})
    recs = [store.record(i) for i in range(T)]
    last = recs[-1]
    R = {n: [r["rows"][n] for r in recs] for n in last["rows"]}
    pile = torch.cat([f[2] for f in feats])
    ztrain, zstored, zrouter = _zoo_params(zoo)
    infer = {"zoo": _timed_ms(lambda: zoo.predict_features(pile), len(pile)),
             "zoo-oracle": _timed_ms(lambda: [zoo.predict_features(f[2], task=t.name) for f, t in zip(feats, tasks)],
                                     len(pile))}
    infer.update({m.name: _timed_ms(lambda m=m: m.agnostic(pile, list(range(T))), len(pile)) for m in methods
                  if not on_pixels(m)})
    if pix is not None:  # the image tower runs on pixels: timed on the first 512 test images, memo cleared
        px = torch.cat([p[2] for p in pix])[:512]
        infer.update({m.name: _timed_ms(lambda m=m: (m.clear_cache(), m.agnostic(px, list(range(T)))), len(px))
                      for m in methods if on_pixels(m)})
    costs = {"zoo": (ztrain, zstored, 0), "zoo-oracle": (ztrain, zstored, 0)}
    costs.update({m.name: (m.trainable_params(), m.stored_params(), m.stored_images())
                  for m in methods})
    out = {}
    for n in R:
        p = last["pooled"][n]
        m = next((x for x in methods if x.name == n), None)
        out[n] = {**summary(R[n]),
                  "task_agnostic_acc": None if n == "zoo-oracle" else round(p["agnostic"] / p["n"], 6),
                  "oracle_acc": round(p["given"] / p["n"], 6),
                  "routing_accuracy": round(last["routed"] / last["n_seen"], 6) if n == "zoo" else None,
                  "uses_task_ids": n == "zoo-oracle",
                  "note": m.note if m else ("routed experts" if n == "zoo" else "the zoo's experts with the task id given"),
                  "cross_check": n in CROSS_CHECKS,
                  "trainable_params": costs[n][0], "stored_params": costs[n][1], "stored_images": costs[n][2],
                  "train_seconds": round(sum(r["train_seconds"][n if n != "zoo-oracle" else "zoo"] for r in recs), 3),
                  "infer_ms_per_image": infer[n],
                  "seen_acc_per_step": [round(v, 6) for v in seen_accuracy_per_step(R[n])],
                  "acc_matrix": R[n]}
    out["zoo"]["router_params"] = out["zoo-oracle"]["router_params"] = zrouter
    if "zero-shot" not in s.methods:
        out.pop("zero-shot")
    per_step = [{"step": r["step"], "task": r["task"], "routing_accuracy": round(r["routed"] / r["n_seen"], 6),
                 "task_agnostic_acc": round(r["pooled"]["zoo"]["agnostic"] / r["n_seen"], 6),
                 "oracle_acc": round(r["pooled"]["zoo"]["given"] / r["n_seen"], 6),
                 "add_task_seconds": r["train_seconds"]["zoo"]} for r in recs]
    per_task = {t.name: {"classes": len(t.classes), "n_train": len(t.train), "n_test": len(t.test),
                         "oracle_acc": R["zoo-oracle"][T - 1][k], "routed_acc": R["zoo"][T - 1][k],
                         "zero_shot_acc": R["zero-shot"][0][k]}
                for k, t in enumerate(tasks)}
    return {"id": rid, "order": [all_tasks[k].name for k in order], "seed": seed, "resumed_from_step": start or None,
            "methods": out, "per_step": per_step, "per_task": per_task, "ood": _ood(zoo, held, last),
            "router": zoo.registry["router"]["kind"], "peak_rss_mb": peak_rss_mb()}


def _encode(tasks: list[TaskData], bb: Backbone) -> list:
    def enc(images, desc):
        return backbone_features(bb, images, desc)

    return [(enc(t.train.images, f"encode {t.name}/train"), torch.tensor(t.train.labels),
             enc(t.test.images, f"encode {t.name}/test"), torch.tensor(t.test.labels)) for t in tasks]


def run_benchmark(tasks: list[TaskData], settings: BenchSettings = BenchSettings(), out: Path | None = None, holdout: TaskData | None = None,
                  resume: bool = False, executor=None) -> dict:
    """Run every (order, seed); write ``report.json``, ``report.md`` and plots under ``out`` if given.

    The first run (the given order, ``settings.seed``) keeps its zoo in ``out/zoo``; the others in
    ``out/runs/<id>/zoo``. Without ``out`` everything lives in a temporary directory. ``executor``:
    where the encoding and the independent runs execute (:mod:`clipzoo.bench.executor`; default:
    in this process, one run after the other); the report is the same either way.
    """
    from clipzoo.bench.executor import LocalExecutor, RunJob
    from clipzoo.bench.report import write_report

    settings.check()
    ex = executor or LocalExecutor()
    t_start = time.perf_counter()
    tmp = None if out else tempfile.TemporaryDirectory(prefix="clipzoo-bench-")
    root = Path(out) if out else Path(tmp.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with ex:
            bb = load_backbone(BackboneSpec(settings.backbone, settings.pretrained))
            t0 = time.perf_counter()
            feats = ex.encode(_encode, tasks + ([holdout] if holdout else []), bb)
            encode_seconds = time.perf_counter() - t0
            held = (holdout.name, feats.pop()[2]) if holdout else None
            settings, tuned = _tune(settings, tasks, feats, bb)
            orders = task_orders(len(tasks), settings.orders, settings.seed)
            plan = [(f"o{o}-s{seed}", order, seed) for o, order in enumerate(orders)
                    for seed in range(settings.seed, settings.seed + settings.seeds)]
            jobs = [RunJob(rid, order, seed, root / "runs" / rid, root / "runs" / rid / "zoo" if k else root / "zoo")
                    for k, (rid, order, seed) in enumerate(plan)]
            runs = ex.runs(_run, jobs, tasks, feats, bb, settings, resume, held)
            result = _assemble(runs, settings, bb, tasks, holdout, encode_seconds, time.perf_counter() - t_start, tuned)
            result["settings"]["executor"] = ex.describe()
        if out:
            write_report(result, root)
        return result
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


def _tune(s: BenchSettings, tasks: list[TaskData], feats: list, bb: Backbone) -> tuple[BenchSettings, dict]:
    """The settings with each baseline's own hyper-parameter chosen on validation data carved from
    the first two tasks' training splits (:mod:`clipzoo.bench.tuning`), and what was tried."""
    if not s.tune:
        return s, {"tuned": False, "reason": "tune=False: the given values were used"}
    embs = [bb.class_embeddings(t.classes, t.templates) for t in tasks[:2]]
    train = replace(s.train(s.seed), head_lr_scale=s.baseline_head_lr_scale)

    texts, exclude = [(t.classes, t.templates) for t in tasks[:2]], _exclude(tasks, None)
    pix = [PX.task_pixels(t, bb) for t in tasks[:2]] if any(m in FT_METHODS for m in s.methods) else None
    chosen: dict = {}  # values chosen so far (ft_lr, chosen on ft-naive, is used by the later ft methods)

    def build(method: str, key: str, value: float):
        return _build([method], embs, bb, train, replace(s, **{**chosen, key: value}), texts, exclude)[0]

    res = tuning.choose(build, s.methods, feats, [t.name for t in tasks], s.val_fraction, VAL_SEED, s.seed,
                        pixels=pix, on_choice=chosen.__setitem__)
    return replace(s, **res["chosen"]), {"tuned": True, **res}


def _assemble(runs: list[dict], s: BenchSettings, bb: Backbone, tasks: list[TaskData], holdout: TaskData | None,
              encode_seconds: float, total: float, tuned: dict) -> dict:
    first = runs[0]
    zoo = first["methods"]["zoo"]
    names = list(first["methods"])
    aggregate = {n: {k: mean_std([r["methods"][n][k] for r in runs]) for k in METRIC_KEYS} for n in names}
    return {
        "schema_version": SCHEMA_VERSION,
        "tasks": first["order"],
        "acc_matrix": zoo["acc_matrix"],
        "metrics": {k: v for k, v in zoo.items() if k != "acc_matrix"},
        "per_step": first["per_step"],
        "per_task": first["per_task"],
        "baselines": {n: m for n, m in first["methods"].items() if n != "zoo"},
        "ood": first["ood"],
        "runs": runs,
        "aggregate": aggregate,
        "timing": {"encode_seconds": round(encode_seconds, 3),
                   "add_task_seconds": [p["add_task_seconds"] for p in first["per_step"]],
                   "inference_ms_per_image_cached_features": zoo["infer_ms_per_image"],
                   "total_seconds": round(total, 3)},
        "memory": {"peak_rss_mb": peak_rss_mb(),
                   "note": "peak resident memory of the whole benchmark process (all methods share it); "
                           "per-method state is in stored_params (float32 numbers)"},
        "settings": {**asdict(s), "router": first["router"], "tuning": tuned,
                     "task_ids_at_test": False, "backbone_fingerprint": bb.fingerprint,
                     "backbone_params": bb.num_params, "sources": [t.source for t in tasks],
                     "holdout": holdout.source if holdout else None,
                     "orders": [r["order"] for r in runs][:: s.seeds], "seeds": list(range(s.seed, s.seed + s.seeds)),
                     "n_orders": s.orders, "n_seeds": s.seeds},
        "machine": machine_info(),
    }
