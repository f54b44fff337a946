"""The zoo: one frozen backbone, one expert per task, a router over them.

``Zoo.create(dir)``, ``Zoo.open(dir)``, ``zoo.add_task(...)``, ``zoo.predict(...)``,
``zoo.evaluate(...)``, ``zoo.verify()``, ``zoo.remove(name)``: the CLI is a thin layer over these.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from router.fusion import KIND as FUSION_KIND
from router.fusion import MODES, FusionExpert, FusionSettings, load_fusion_expert
from router.gate import NearestStatsRouter, Routing
from router.stats import TaskStats, compute_stats
from tasks.data import load_task
from tasks.spec import ImageSource, TaskData, check_name
from zoo import __version__, registry
from zoo.backbone import Backbone, BackboneSpec, load_backbone
from zoo.cache import FeatureCache, encode_cached
from zoo.errors import BackboneError, ConfigError, RegistryError
from zoo.expert import Expert, build_expert, load_expert
from zoo.train import TrainSettings, fit


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    return float((pred == true).float().mean()) if len(true) else 0.0


class Zoo:
    """A zoo directory (see :mod:`zoo.registry` for its layout)."""

    def __init__(self, root: Path, reg: dict, cache_root: Path | None = None):
        self.root = Path(root)
        self.registry = reg
        self.cache_root = cache_root
        self._backbone: Backbone | None = None
        self._experts: dict[str, tuple[str, Expert]] = {}

    # ----- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, backbone: BackboneSpec = BackboneSpec(), cache_root: Path | None = None) -> "Zoo":
        """Make an empty zoo on ``backbone`` (loaded now, so a bad backbone fails here)."""
        root = Path(root)
        if (root / registry.REGISTRY).exists():
            raise RegistryError(f"a zoo already exists at {root}: open it, or choose another --zoo")
        if root.exists() and any(root.iterdir()):
            raise RegistryError(f"{root} exists and is not empty: choose an empty or new directory")
        bb = load_backbone(backbone)
        root.mkdir(parents=True, exist_ok=True)
        (root / registry.EXPERTS_DIR).mkdir(exist_ok=True)
        (root / registry.LOCK).touch()
        reg = {
            "schema_version": registry.SCHEMA_VERSION,
            "clipzoo_version": __version__,
            "backbone": {**backbone.to_dict(), "fingerprint": bb.fingerprint, "params": bb.num_params,
                         "embed_dim": bb.embed_dim},
            "router": {"kind": NearestStatsRouter.name, "version": 0},
            "experts": {},
        }
        registry.write(root, reg)
        zoo = cls(root, reg, cache_root)
        zoo._backbone = bb
        return zoo

    @classmethod
    def open(cls, root: str | Path, cache_root: Path | None = None) -> "Zoo":
        root = Path(root)
        return cls(root, registry.read(root), cache_root)

    def reload(self) -> None:
        self.registry = registry.read(self.root)

    # ----- backbone and features -----------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            spec = BackboneSpec.from_dict(self.registry["backbone"])
            bb = load_backbone(spec)
            if bb.fingerprint != self.registry["backbone"]["fingerprint"]:
                raise BackboneError(
                    f"backbone {spec} now has fingerprint {bb.fingerprint[:12]}, but this zoo was built on "
                    f"{self.registry['backbone']['fingerprint'][:12]}: restore the original weights"
                )
            self._backbone = bb
        return self._backbone

    def feature_cache(self) -> FeatureCache:
        bb = self.backbone
        return FeatureCache([bb.fingerprint, bb.preprocess_id], self.cache_root)

    def features(self, images: Sequence[ImageSource], desc: str = "encode", progress: bool = True) -> torch.Tensor:
        """Frozen image embeddings, each image encoded once per backbone (feature cache)."""
        bb = self.backbone
        with tqdm(total=len(images), desc=desc, disable=not progress or len(images) < 64, leave=False) as bar:
            return encode_cached(images, bb.preprocess, bb.encode_images, self.feature_cache(), progress=bar.update)

    def pixels(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Preprocessed pixels ``(N, 3, H, W)`` for experts that work inside the encoder."""
        from tasks.data import open_image

        return torch.stack([self.backbone.preprocess(open_image(im)) for im in images])

    # ----- experts --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.registry["experts"])

    def record(self, name: str) -> dict:
        if name not in self.registry["experts"]:
            known = ", ".join(self.names) or "none"
            raise RegistryError(f"no expert named {name!r} in {self.root} (experts: {known})")
        return self.registry["experts"][name]

    def expert_dir(self, name: str) -> Path:
        return self.root / registry.EXPERTS_DIR / name

    def expert(self, name: str) -> Expert:
        """The expert, loaded lazily and kept while its weights hash is unchanged."""
        rec = self.record(name)
        cached = self._experts.get(name)
        if cached and cached[0] == rec["sha256"]:
            return cached[1]
        if rec["kind"] == FUSION_KIND:
            exp = load_fusion_expert(self.expert_dir(name), self.backbone.fingerprint, self.expert,
                                     lambda n: self.record(n)["sha256"])
        else:
            exp = load_expert(self.expert_dir(name), self.backbone)
        self._experts[name] = (rec["sha256"], exp)
        return exp

    def stats(self, name: str) -> TaskStats:
        self.record(name)
        return TaskStats.load(self.expert_dir(name))

    def router(self) -> NearestStatsRouter:
        return NearestStatsRouter({n: self.stats(n) for n in self.names})

    def list(self) -> list[dict]:
        return [dict(rec) for rec in self.registry["experts"].values()]

    # ----- adding and removing tasks --------------------------------------------------------
    def add_task(self, data: TaskData | str | Path, name: str | None = None, kind: str = "clip-adapter",
                 settings: dict | None = None, train: TrainSettings = TrainSettings(), progress: bool = True,
                 sources: Sequence[str] | None = None) -> dict:
        """Train a fresh expert for a new task and commit it atomically; other experts are untouched.

        Any failure (bad data, bad settings, an interrupted write) leaves the zoo as it was.
        ``kind='fusion'`` composes existing experts (``sources``, default all) instead.
        """
        if kind == FUSION_KIND or sources:
            return self._add_fusion_task(data, name, kind, sources, settings, train, progress)
        t0 = time.perf_counter()
        task = data if isinstance(data, TaskData) else load_task(data, name=name)
        name = check_name(name or task.name)
        if name in self.registry["experts"]:
            raise RegistryError(f"task {name!r} already exists in {self.root}: choose another --name or remove it first")
        if train.epochs < 1 or train.batch_size < 1 or train.lr <= 0:
            raise ConfigError("epochs and batch size must be >= 1 and lr > 0")
        bb = self.backbone
        expert = build_expert(kind, bb, task.classes, task.templates, settings)
        x_train = self.features(task.train.images, f"encode {name}/train", progress)
        y_train = torch.tensor(task.train.labels)
        zero_shot = build_expert(kind, bb, task.classes, task.templates, settings)
        inputs = (x_train, self.pixels(task.train.images)) if expert.needs_pixels else (x_train,)
        history = fit(expert, inputs, y_train, train, desc=f"train {name}", progress=progress)
        metrics = {k: round(v, 6) for k, v in history.items()}
        if len(task.test):
            x_test = self.features(task.test.images, f"encode {name}/test", progress)
            test_in = (x_test, self.pixels(task.test.images)) if expert.needs_pixels else (x_test,)
            y_test = torch.tensor(task.test.labels)
            with torch.no_grad():
                metrics["test_acc"] = round(accuracy(expert(*test_in).argmax(1), y_test), 6)
                metrics["zero_shot_acc"] = round(accuracy(zero_shot(*test_in).argmax(1), y_test), 6)
        stats = compute_stats(x_train, y_train, len(task.classes))
        n_params = expert.trainable_params()
        record = {
            "name": name,
            "kind": expert.kind,
            "classes": task.classes,
            "templates": task.templates,
            "files": {},
            "sha256": "",
            "trainable_params": n_params,
            "trainable_share": n_params / bb.num_params,
            "training": {**train.to_dict(), "data": task.source, "n_train": len(task.train),
                         "n_test": len(task.test), "settings": settings or {}},
            "metrics": metrics,
            "created": _now(),
        }
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        try:
            written = expert.save(staging) + [stats.save(staging)]
            record["files"] = {f: registry.sha256_file(staging / f) for f in written}
            record["sha256"] = record["files"]["weights.safetensors"]
            record["metrics"]["add_seconds"] = round(time.perf_counter() - t0, 3)
            self._commit_new_expert(name, staging, record)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._experts[name] = (record["sha256"], expert.eval())
        return record

    def _commit_new_expert(self, name: str, staging: Path, record: dict) -> None:
        """Under the lock: re-read the registry, move the folder in, write the registry."""
        with registry.lock(self.root):
            reg = registry.read(self.root)
            if name in reg["experts"]:
                raise RegistryError(f"task {name!r} was added meanwhile by another process: choose another --name")
            target = self.expert_dir(name)
            if target.exists():  # left over from a crash between the move and the registry write
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            os.rename(staging, target)
            reg["experts"][name] = record
            reg["router"] = {**reg.get("router", {}), "version": int(reg.get("router", {}).get("version", 0)) + 1}
            try:
                registry.write(self.root, reg)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            self.registry = reg

    def remove(self, name: str, cascade: bool = False) -> None:
        """Drop an expert: the registry first (atomic), then its folder. An expert that fusion
        experts compose is refused, or removed after them with ``cascade=True``."""
        users = self.dependents(name)
        if users and not cascade:
            raise RegistryError(f"expert {name!r} is a source of fusion expert(s) {', '.join(users)}: "
                                "remove those first, or use --cascade to remove them too")
        for user in users:
            self.remove(user, cascade=True)
        with registry.lock(self.root):
            reg = registry.read(self.root)
            if name not in reg["experts"]:
                raise RegistryError(f"no expert named {name!r} in {self.root}")
            del reg["experts"][name]
            reg["router"] = {**reg.get("router", {}), "version": int(reg.get("router", {}).get("version", 0)) + 1}
            registry.write(self.root, reg)
            self.registry = reg
        shutil.rmtree(self.expert_dir(name), ignore_errors=True)
        self._experts.pop(name, None)

    # ----- integrity ------------------------------------------------------------------------
    def verify(self) -> dict:
        """Recompute every file's sha256 against the registry."""
        problems = []
        for name, rec in self.registry["experts"].items():
            for fname, digest in rec["files"].items():
                path = self.expert_dir(name) / fname
                if not path.is_file():
                    problems.append(f"{name}/{fname}: missing")
                elif registry.sha256_file(path) != digest:
                    problems.append(f"{name}/{fname}: sha256 mismatch")
        return {"ok": not problems, "experts": len(self.registry["experts"]), "problems": problems}

    # ----- inference ------------------------------------------------------------------------
    def route(self, feats: torch.Tensor, top_k: int = 1) -> Routing:
        if not self.names:
            raise RegistryError(f"the zoo at {self.root} has no experts yet: add one with 'clipzoo add-task'")
        return self.router().route(feats, top_k)

    def predict_features(self, feats: torch.Tensor, task: str | None = None, top_k: int = 1,
                         pixels: Callable[[list[int]], torch.Tensor] | None = None, mode: str = "top1") -> list[dict]:
        """Predictions for frozen features; each input runs only through its chosen expert
        (inputs grouped by expert). ``pixels(indices)`` supplies preprocessed pixels for experts
        that work inside the encoder. ``mode`` 'avg' / 'fusion' combine the routed top-k
        (:meth:`predict_fused`); a given ``task`` ignores it."""
        if mode != "top1" and task is None:
            return self.predict_fused(feats, top_k, pixels, mode)
        if task is not None:
            self.record(task)
            chosen = [task] * len(feats)
            routing = [{task: 1.0}] * len(feats)
        else:
            r = self.route(feats, top_k)
            chosen = [r.names[int(i)] for i in r.indices[:, 0]]
            routing = r.as_dicts()
        out: list[dict] = [{} for _ in range(len(feats))]
        for name in dict.fromkeys(chosen):
            idx = [i for i, c in enumerate(chosen) if c == name]
            exp = self.expert(name)
            if exp.needs_pixels and pixels is None:
                raise ConfigError(f"expert {name!r} ({exp.kind}) needs images, not only cached features")
            args = (feats[idx], pixels(idx)) if exp.needs_pixels else (feats[idx],)
            with torch.no_grad():
                probs = exp(*args).softmax(1)
            score, label = probs.max(1)
            for j, i in enumerate(idx):
                out[i] = {"task": name, "label": exp.classes[int(label[j])], "score": round(float(score[j]), 6),
                          "routing": routing[i]}
        return out

    def predict(self, images: Sequence[ImageSource], task: str | None = None, top_k: int = 1,
                progress: bool = False, mode: str = "top1") -> list[dict]:
        feats = self.features(images, "encode", progress)
        preds = self.predict_features(feats, task, top_k, pixels=lambda idx: self.pixels([images[i] for i in idx]),
                                      mode=mode)
        for i, (img, p) in enumerate(zip(images, preds)):
            p["path"] = str(img) if isinstance(img, (str, Path)) else f"<image {i}>"
        return [{"path": p.pop("path"), **p} for p in preds]

    def evaluate(self, data: TaskData | str | Path, task: str | None = None, progress: bool = False) -> dict:
        """Accuracy on a task's test split: with ``task`` given (oracle) or routed.

        Routed, a prediction counts only if it names the right class *and* went to the data's own
        task, when that task is known (an expert of the same name, or of the same class list).
        """
        td = data if isinstance(data, TaskData) else load_task(data)
        feats = self.features(td.test.images, "encode", progress)
        preds = self.predict_features(feats, task, pixels=lambda idx: self.pixels([td.test.images[i] for i in idx]))
        own = task or (td.name if td.name in self.registry["experts"] else next(
            (n for n, r in self.registry["experts"].items() if r["classes"] == td.classes), None))
        true = [td.classes[y] for y in td.test.labels]
        ok = [p["label"] == t and (own is None or p["task"] == own) for p, t in zip(preds, true)]
        per_class = {c: round(sum(o for o, t in zip(ok, true) if t == c) / max(1, true.count(c)), 6) for c in td.classes}
        result = {"accuracy": round(sum(ok) / max(1, len(ok)), 6), "per_class": per_class, "n": len(ok),
                  "task_ids": "given" if task else "routed", "task": own}
        if task is None and own is not None:
            result["routing_accuracy"] = round(sum(p["task"] == own for p in preds) / max(1, len(preds)), 6)
        return result


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
