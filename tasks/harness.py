"""The forgetting benchmark: train through a task sequence and fill each method's accuracy matrix.

The zoo is a real zoo directory (``OUT/zoo``) grown with ``Zoo.add_task``; baselines run on the
same cached frozen features with the same epochs, learning rate and seed. Lower-triangle entries
(``j <= i``) are task-agnostic for every method unless it says ``uses_task_ids``: an answer counts
only if it names the right task and the right class. Upper-triangle entries (``j > i``) give the
task's class names (zero-shot transfer to a task not learned yet).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tasks.baselines import NaiveSequential, ZeroShot
from tasks.data import builtin_domains, load_builtin, load_imagefolder
from tasks.metrics import summary
from tasks.spec import TaskData
from zoo.backbone import BackboneSpec
from zoo.train import TrainSettings
from zoo.zoo import Zoo


@dataclass
class BenchSettings:
    seed: int = 0
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    kind: str = "clip-adapter"
    backbone: str = "clipzoo-tiny"
    pretrained: str | None = "embedded"

    def train(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed)


def load_sequence(domains: list[str], builtin: str | None = None) -> list[TaskData]:
    """ImageFolder directories in the given order, or the built-in synthetic domains."""
    seq = [load_builtin(d) for d in builtin_domains()] if builtin == "synthetic" else []
    seq += [load_imagefolder(d) for d in domains]
    if len(seq) < 2:
        from zoo.errors import ConfigError

        raise ConfigError("a benchmark needs at least 2 tasks: give DOMAIN_DIRs or --builtin synthetic")
    return seq


def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu"}


def _acc(ok: torch.Tensor) -> float:
    return round(float(ok.float().mean()), 6) if len(ok) else 0.0


def run_benchmark(tasks: list[TaskData], settings: BenchSettings = BenchSettings(), out: Path | None = None,
                  progress: bool = True, cache_root: Path | None = None) -> dict:
    """Run the sequence; write ``report.json``, ``report.md`` and heatmaps under ``out`` if given."""
    from tasks.report import write_report

    t_start = time.perf_counter()
    T = len(tasks)
    zoo_dir = (out or Path(".")) / "zoo" if out else Path(os.environ.get("TMPDIR", "/tmp")) / f"clipzoo-bench-{os.getpid()}"
    if zoo_dir.exists():
        shutil.rmtree(zoo_dir)
    zoo = Zoo.create(zoo_dir, BackboneSpec(settings.backbone, settings.pretrained), cache_root=cache_root)
    bb = zoo.backbone
    t0 = time.perf_counter()
    feats = [(zoo.features(t.train.images, f"encode {t.name}/train", progress), torch.tensor(t.train.labels),
              zoo.features(t.test.images, f"encode {t.name}/test", progress), torch.tensor(t.test.labels)) for t in tasks]
    encode_seconds = time.perf_counter() - t0
    class_embs = [bb.class_embeddings(t.classes, t.templates) for t in tasks]
    baselines = [ZeroShot(class_embs, bb.logit_scale), NaiveSequential(class_embs, bb.logit_scale, settings.train())]
    names = ["zoo", "zoo-oracle"] + [b.name for b in baselines]
    R = {n: [[0.0] * T for _ in range(T)] for n in names}
    pooled = {n: {"agnostic": [], "given": []} for n in names}
    steps, add_seconds = [], []
    for i in tqdm(range(T), desc="benchmark steps", disable=not progress):
        t0 = time.perf_counter()
        zoo.add_task(tasks[i], train=settings.train(), kind=settings.kind, progress=False)
        add_seconds.append(round(time.perf_counter() - t0, 3))
        for b in baselines:
            b.learn(i, feats[i][0], feats[i][1])
        seen = list(range(i + 1))
        pile_route, pile_ok, pile_oracle = [], [], []
        for j in range(T):
            x, y = feats[j][2], feats[j][3]
            if j > i:  # not learned yet: zero-shot transfer with the task's class names
                zs = _acc(baselines[0].given(x, j) == y)
                R["zoo"][i][j] = R["zoo-oracle"][i][j] = zs
                for b in baselines:
                    R[b.name][i][j] = _acc(b.unseen(x, j) == y)
                continue
            preds = zoo.predict_features(x)
            routed = torch.tensor([p["task"] == tasks[j].name for p in preds])
            label_ok = torch.tensor([p["label"] == tasks[j].classes[int(c)] for p, c in zip(preds, y)])
            oracle = torch.tensor([p["label"] == tasks[j].classes[int(c)]
                                   for p, c in zip(zoo.predict_features(x, task=tasks[j].name), y)])
            R["zoo"][i][j] = _acc(routed & label_ok)
            R["zoo-oracle"][i][j] = _acc(oracle)
            pile_route.append(routed)
            pile_ok.append(routed & label_ok)
            pile_oracle.append(oracle)
            for b in baselines:
                bt, bc = b.agnostic(x, seen)
                ok_agn = (bt == j) & (bc == y)
                R[b.name][i][j] = _acc(ok_agn)
                if i == T - 1:
                    pooled[b.name]["agnostic"].append(ok_agn)
                    pooled[b.name]["given"].append(b.given(x, j) == y)
        steps.append({"step": i, "task": tasks[i].name, "routing_accuracy": _acc(torch.cat(pile_route)),
                      "task_agnostic_acc": _acc(torch.cat(pile_ok)), "oracle_acc": _acc(torch.cat(pile_oracle)),
                      "add_task_seconds": add_seconds[-1]})
    # inference cost on the final pile (features cached): routing + the chosen expert only
    pile = torch.cat([f[2] for f in feats])
    t0 = time.perf_counter()
    zoo.predict_features(pile)
    infer_ms = 1000 * (time.perf_counter() - t0) / len(pile)
    final = steps[-1]
    metrics = {**summary(R["zoo"]), "task_agnostic_acc": final["task_agnostic_acc"], "oracle_acc": final["oracle_acc"],
               "routing_accuracy": final["routing_accuracy"]}
    base = {"zoo-oracle": {**summary(R["zoo-oracle"]), "task_agnostic_acc": None, "oracle_acc": final["oracle_acc"],
                           "routing_accuracy": None, "uses_task_ids": True, "acc_matrix": R["zoo-oracle"]}}
    for b in baselines:
        base[b.name] = {**summary(R[b.name]),
                        "task_agnostic_acc": _acc(torch.cat(pooled[b.name]["agnostic"])),
                        "oracle_acc": _acc(torch.cat(pooled[b.name]["given"])),
                        "routing_accuracy": None, "uses_task_ids": False, "acc_matrix": R[b.name]}
    result = {
        "tasks": [t.name for t in tasks],
        "acc_matrix": R["zoo"],
        "metrics": metrics,
        "per_step": steps,
        "per_task": {t.name: {"classes": len(t.classes), "n_train": len(t.train), "n_test": len(t.test),
                              "oracle_acc": R["zoo-oracle"][T - 1][k], "routed_acc": R["zoo"][T - 1][k],
                              "zero_shot_acc": _acc(baselines[0].given(feats[k][2], k) == feats[k][3])}
                     for k, t in enumerate(tasks)},
        "baselines": base,
        "timing": {"encode_seconds": round(encode_seconds, 3), "add_task_seconds": add_seconds,
                   "inference_ms_per_image_cached_features": round(infer_ms, 4),
                   "total_seconds": round(time.perf_counter() - t_start, 3)},
        "settings": {**asdict(settings), "router": zoo.registry["router"]["kind"], "task_ids_at_test": False,
                     "backbone_fingerprint": bb.fingerprint, "backbone_params": bb.num_params,
                     "sources": [t.source for t in tasks]},
        "machine": machine_info(),
    }
    if out:
        write_report(result, out)
    return result
