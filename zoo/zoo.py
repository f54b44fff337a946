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

from router.fusion import KIND as FUSION_KIND
from router.fusion import (MODES, FusionExpert, FusionSettings, GlobalFusion, average_predict, fusion_key,
                           load_fusion_expert, load_or_train_global, train_global_fusion)
from router.gate import NearestStatsRouter, Routing
from router.learned import KIND as LEARNED_ROUTER
from router.learned import RouterConfig, SparseRouter
from router.ood import DEFAULT_QUANTILE, check_quantile
from router.stats import TaskStats, compute_stats
from tasks.data import load_task
from tasks.spec import DEFAULT_TEMPLATES, ImageSource, TaskData, check_name
from zoo import __version__, registry
from zoo.backbone import Backbone, BackboneSpec, load_backbone
from zoo.cache import backbone_features, default_root
from zoo.errors import BackboneError, ConfigError, RegistryError
from zoo.expert import Expert, build_expert, load_expert
from zoo.train import Criterion, TrainSettings, cross_entropy, fit


ROUTER_DIR = "router"  # the learned router's versioned files: router-v<version>.{safetensors,json}


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
        self._router: tuple[str, NearestStatsRouter | SparseRouter] | None = None
        self._fusions: dict[str, GlobalFusion] = {}
        self._zero_shot_emb: dict[tuple[str, ...], torch.Tensor] = {}

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
            "router": {"kind": LEARNED_ROUTER, "version": 0, "files": {}},
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

    def features(self, images: Sequence[ImageSource], desc: str = "encode", progress: bool = True) -> torch.Tensor:
        """Frozen image embeddings, each image encoded once per backbone (feature cache)."""
        return backbone_features(self.backbone, images, self.cache_root, desc, progress)

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

    def router(self) -> NearestStatsRouter | SparseRouter:
        """The zoo's router, ``registry["router"]["kind"]``: ``learned`` (the gate in its versioned
        file, loaded once per version) or ``nearest-stats`` (built from every task's stats)."""
        spec = self.registry.get("router", {})
        key = json.dumps(spec, sort_keys=True)
        if self._router is None or self._router[0] != key:  # every add/remove/refresh bumps the version
            self._router = (key, self._load_router(spec, self.names))
        return self._router[1]

    def _load_router(self, spec: dict, names: list[str]) -> NearestStatsRouter | SparseRouter:
        """The router ``spec`` describes, over the experts ``names`` (a learned router without a file
        is trained from the stats, in memory)."""
        kind, q = spec.get("kind", NearestStatsRouter.name), float(spec.get("ood_quantile", DEFAULT_QUANTILE))
        if kind == NearestStatsRouter.name:
            return NearestStatsRouter({n: TaskStats.load(self.expert_dir(n)) for n in names}, q)
        if kind != LEARNED_ROUTER:
            raise RegistryError(f"unknown router kind {kind!r} in registry.json: use {NearestStatsRouter.name!r} "
                                f"or {LEARNED_ROUTER!r} (clipzoo router --zoo {self.root} --kind KIND)")
        files = sorted(spec.get("files", {}))
        if not files:
            return SparseRouter.from_stats({n: TaskStats.load(self.expert_dir(n)) for n in names}, ood_quantile=q)
        r = SparseRouter.load(self.root / files[1], self.root / files[0], q)   # sorted: .json, .safetensors
        if set(r.names) != set(names):
            raise RegistryError(f"the router file {files[1]} covers {r.names}, not the experts {names}: "
                                f"run 'clipzoo router --zoo {self.root} --rebuild'")
        return r

    def _stage_router(self, reg: dict, add: str | None = None, drop: str | None = None, rebuild: bool = False,
                      config: RouterConfig | None = None) -> list[Path]:
        """Bump ``reg["router"]``'s version; for a learned router write its next version (``add`` a
        slot, ``drop`` one, or ``rebuild`` from all stats) under a new name and list it in ``reg``.
        Returns the files written (nothing points at them until ``reg`` is written)."""
        old = reg.get("router", {})
        version = int(old.get("version", 0)) + 1
        spec = {**old, "kind": old.get("kind", NearestStatsRouter.name), "version": version, "files": {}}
        names = list(reg["experts"])
        if spec["kind"] != LEARNED_ROUTER or not names:
            reg["router"] = spec
            return []
        before = [n for n in names if n != add] + ([drop] if drop else [])
        q = float(spec.get("ood_quantile", DEFAULT_QUANTILE))
        if rebuild or not before or not old.get("files"):
            cfg = config or self._saved_router_config(old) or RouterConfig()
            r = SparseRouter.from_stats({n: TaskStats.load(self.expert_dir(n)) for n in names}, cfg, q)
        else:
            r = self._load_router(old, before)
            if drop:
                r.remove(drop)
            if add:
                r.add(add, TaskStats.load(self.expert_dir(add)))
        stem = f"router-v{version}"
        try:
            written = [self.root / ROUTER_DIR / f for f in r.save(self.root / ROUTER_DIR, stem)]
        except BaseException:  # a partly written version: remove it
            for p in (self.root / ROUTER_DIR).glob(f"{stem}.*"):
                p.unlink(missing_ok=True)
            raise
        spec["files"] = {str(p.relative_to(self.root)): registry.sha256_file(p) for p in written}
        reg["router"] = spec
        return written

    def _saved_router_config(self, spec: dict) -> RouterConfig | None:
        """The learned gate's settings saved in the router file ``spec`` lists, if any."""
        meta = [self.root / f for f in spec.get("files", {}) if f.endswith(".json")]
        if not meta or not meta[0].is_file():
            return None
        return RouterConfig.from_dict(json.loads(meta[0].read_text())["config"])

    def _prune_router_files(self, keep: set[str]) -> None:
        """Delete router files not in ``keep`` (paths relative to the zoo)."""
        folder = self.root / ROUTER_DIR
        for p in folder.glob("router-v*") if folder.is_dir() else []:
            if str(p.relative_to(self.root)) not in keep:
                p.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def refresh_router(self, kind: str | None = None, ood_quantile: float | None = None,
                       config: RouterConfig | None = None) -> dict:
        """Rebuild the router from every task's stats (optionally switching ``kind``, the OOD
        quantile or the learned gate's settings) and commit it as a new version; returns
        ``registry["router"]``."""
        if kind not in (None, NearestStatsRouter.name, LEARNED_ROUTER):
            raise ConfigError(f"unknown router kind {kind!r}: choose {NearestStatsRouter.name!r} or {LEARNED_ROUTER!r}")
        if ood_quantile is not None:
            check_quantile(ood_quantile)
        with registry.lock(self.root):
            reg = registry.read(self.root)
            old_files = set(reg.get("router", {}).get("files", {}))
            reg["router"] = {**reg.get("router", {}), **({"kind": kind} if kind else {}),
                             **({"ood_quantile": ood_quantile} if ood_quantile is not None else {})}
            self._commit_router(reg, old_files, lambda: self._stage_router(reg, rebuild=True, config=config))
        return dict(self.registry["router"])

    def _commit_router(self, reg: dict, old_files: set[str], stage: Callable[[], list[Path]],
                       undo: Callable[[], None] = lambda: None) -> None:
        """Under the lock: stage the router, write ``reg``; on any failure remove what was staged
        (and ``undo()``), so the zoo is exactly as it was."""
        written: list[Path] = []
        try:
            written = stage()
            registry.write(self.root, reg)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            if written and not any(written[0].parent.iterdir()):
                written[0].parent.rmdir()
            undo()
            raise
        self._prune_router_files(old_files | set(reg["router"]["files"]))
        self.registry = reg

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
        task, name = self._new_task(data, name, train)
        bb = self.backbone
        expert = build_expert(kind, bb, task.classes, task.templates, settings)
        return self._train_and_commit(expert, task, name, train, settings, progress, t0, verb="train",
                                      zero_shot=expert.zero_shot, criterion=expert.criterion)

    def _new_task(self, data: TaskData | str | Path, name: str | None, train: TrainSettings) -> tuple[TaskData, str]:
        """Load the task data and check the name is free and the training settings are sane."""
        task = data if isinstance(data, TaskData) else load_task(data, name=name)
        name = check_name(name or task.name)
        if name in self.registry["experts"]:
            raise RegistryError(f"task {name!r} already exists in {self.root}: choose another --name or remove it first")
        if train.epochs < 1 or train.batch_size < 1 or train.lr <= 0:
            raise ConfigError("epochs and batch size must be >= 1 and lr > 0")
        return task, name

    def _train_and_commit(self, expert: torch.nn.Module, task: TaskData, name: str, train: TrainSettings,
                          settings: dict | None, progress: bool, t0: float, verb: str,
                          zero_shot: Callable[[torch.Tensor], torch.Tensor], criterion: Criterion = cross_entropy,
                          extra: dict | None = None) -> dict:
        """Fit ``expert`` on the task's cached features, score it on the test split, stage its files
        with their stats and commit it atomically. Returns the registry record."""
        x_train = self.features(task.train.images, f"encode {name}/train", progress)
        y_train = torch.tensor(task.train.labels)
        inputs = (x_train, self.pixels(task.train.images)) if expert.needs_pixels else (x_train,)
        history = fit(expert, inputs, y_train, train, desc=f"{verb} {name}", progress=progress, criterion=criterion)
        metrics = {k: round(v, 6) for k, v in history.items()}
        if len(task.test):
            x_test = self.features(task.test.images, f"encode {name}/test", progress)
            test_in = (x_test, self.pixels(task.test.images)) if expert.needs_pixels else (x_test,)
            y_test = torch.tensor(task.test.labels)
            with torch.no_grad():
                metrics["test_acc"] = round(accuracy(expert(*test_in).argmax(1), y_test), 6)
                metrics["zero_shot_acc"] = round(accuracy(zero_shot(x_test).argmax(1), y_test), 6)
        n_params = expert.trainable_params()
        record = {
            "name": name,
            "kind": expert.kind,
            **(extra or {}),
            "classes": task.classes,
            "templates": task.templates,
            "files": {},
            "sha256": "",
            "trainable_params": n_params,
            "trainable_share": n_params / self.backbone.num_params,
            "training": {**train.to_dict(), "data": task.source, "n_train": len(task.train),
                         "n_test": len(task.test), "settings": settings or {}},
            "metrics": metrics,
            "created": _now(),
        }
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        try:
            written = expert.save(staging) + [compute_stats(x_train, y_train, len(task.classes)).save(staging)]
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
            old_files = set(reg.get("router", {}).get("files", {}))
            reg["experts"][name] = record
            self._commit_router(reg, old_files, lambda: self._stage_router(reg, add=name),
                                undo=lambda: shutil.rmtree(target, ignore_errors=True))

    def remove(self, name: str, cascade: bool = False) -> list[str]:
        """Drop an expert: the registry first (atomic), then its folder. An expert that fusion
        experts compose is refused, or removed after them with ``cascade=True``. Returns every
        name removed, ``name`` last."""
        users = self.dependents(name)
        if users and not cascade:
            raise RegistryError(f"expert {name!r} is a source of fusion expert(s) {', '.join(users)}: "
                                "remove those first, or use --cascade to remove them too")
        removed: list[str] = []
        for user in users:
            if user in registry.read(self.root)["experts"]:  # not already gone with another user
                removed += self.remove(user, cascade=True)
        with registry.lock(self.root):
            reg = registry.read(self.root)
            if name not in reg["experts"]:
                raise RegistryError(f"no expert named {name!r} in {self.root}")
            del reg["experts"][name]
            old_files = set(reg.get("router", {}).get("files", {}))
            self._commit_router(reg, old_files, lambda: self._stage_router(reg, drop=name))
        shutil.rmtree(self.expert_dir(name), ignore_errors=True)
        self._experts.pop(name, None)
        return removed + [name]

    # ----- integrity ------------------------------------------------------------------------
    def verify(self) -> dict:
        """Recompute every file's sha256 against the registry."""
        listed = [(f"{name}/{fname}", self.expert_dir(name) / fname, digest)
                  for name, rec in self.registry["experts"].items() for fname, digest in rec["files"].items()]
        listed += [(rel, self.root / rel, digest) for rel, digest in self.registry.get("router", {}).get("files", {}).items()]
        problems = [f"{label}: missing" if not path.is_file() else f"{label}: sha256 mismatch"
                    for label, path, digest in listed if not path.is_file() or registry.sha256_file(path) != digest]
        if not problems and self.registry.get("router", {}).get("files"):
            try:
                self._load_router(self.registry["router"], self.names)
            except RegistryError as e:
                problems.append(str(e))
        return {"ok": not problems, "experts": len(self.registry["experts"]), "problems": problems}

    # ----- inference ------------------------------------------------------------------------
    def route(self, feats: torch.Tensor, top_k: int = 1) -> Routing:
        if not self.names:
            raise RegistryError(f"the zoo at {self.root} has no experts yet: add one with 'clipzoo add-task'")
        return self.router().route(feats, top_k)

    def predict_features(self, feats: torch.Tensor, task: str | None = None, top_k: int = 1,
                         pixels: Callable[[list[int]], torch.Tensor] | None = None, mode: str = "top1",
                         fallback: bool = True, classes: Sequence[str] | None = None) -> list[dict]:
        """Predictions for frozen features; each input runs only through its chosen expert
        (inputs grouped by expert). ``pixels(indices)`` supplies preprocessed pixels for experts
        that work inside the encoder. ``mode`` 'avg' / 'fusion' combine the routed top-k
        (:meth:`predict_fused`); a given ``task`` ignores it.

        Routed inputs that belong to no known task (calibrated OOD score > 0) are answered by
        zero-shot CLIP over ``classes`` (default: every expert's classes) with ``task`` None and
        ``fallback`` True, unless ``fallback=False``. Each answer has task, label, score, routing
        (top-k weights), fallback, and ``ood_score`` when routed."""
        if mode != "top1" and task is None:
            return self.predict_fused(feats, top_k, pixels, mode, fallback, classes)
        if task is not None:
            self.record(task)
            chosen = [task] * len(feats)
            routing = [{task: 1.0}] * len(feats)
            fell, ood = [False] * len(feats), None
        else:
            r = self.route(feats, top_k)
            chosen = [r.names[int(i)] for i in r.indices[:, 0]]
            routing = r.as_dicts()
            fell, ood = (r.fallback.tolist() if fallback else [False] * len(feats)), r.ood_score
        out: list[dict] = [{"routing": routing[i]} for i in range(len(feats))]
        for name in dict.fromkeys(c for c, f in zip(chosen, fell) if not f):
            idx = [i for i, c in enumerate(chosen) if c == name and not fell[i]]
            exp = self.expert(name)
            if exp.needs_pixels and pixels is None:
                raise ConfigError(f"expert {name!r} ({exp.kind}) needs images, not only cached features")
            args = (feats[idx], pixels(idx)) if exp.needs_pixels else (feats[idx],)
            with torch.no_grad():
                probs = exp(*args).softmax(1)
            score, label = probs.max(1)
            for j, i in enumerate(idx):
                out[i] = {"task": name, "label": exp.classes[int(label[j])], "score": round(float(score[j]), 6),
                          "routing": routing[i], "fallback": False}
        return self._fall_back(out, feats, fell, ood, classes)

    def _fall_back(self, preds: list[dict], feats: torch.Tensor, fell: list[bool], ood: torch.Tensor | None,
                   classes: Sequence[str] | None) -> list[dict]:
        """Answer the inputs marked in ``fell`` with zero-shot CLIP (task None, fallback True) and
        add each input's ``ood_score`` when routed."""
        idx = [i for i, f in enumerate(fell) if f]
        if idx:
            names, probs = self.zero_shot(feats[idx], classes)
            score, label = probs.max(1)
            for j, i in enumerate(idx):
                preds[i].update(task=None, label=names[int(label[j])], score=round(float(score[j]), 6), fallback=True)
        for p, o in zip(preds, ood.tolist() if ood is not None else []):
            p["ood_score"] = round(o, 4)
        return preds

    def zero_shot(self, feats: torch.Tensor, classes: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """Zero-shot CLIP over ``classes`` (default: every expert's classes, each once): the class
        names and probabilities ``(B, C)``."""
        names = list(dict.fromkeys(classes if classes is not None else
                                   [c for rec in self.registry["experts"].values() for c in rec["classes"]]))
        if not names or not all(isinstance(c, str) and c.strip() for c in names):
            raise ConfigError("zero-shot fallback needs non-empty class names: pass classes (--classes a,b,c)")
        bb = self.backbone
        key = tuple(names)
        if key not in self._zero_shot_emb:  # the text tower runs once per class list, not per call
            self._zero_shot_emb[key] = bb.class_embeddings(names, DEFAULT_TEMPLATES)
        emb = self._zero_shot_emb[key]
        with torch.no_grad():
            probs = (bb.logit_scale * torch.nn.functional.normalize(feats.float(), dim=-1) @ emb.T).softmax(1)
        return names, probs

    def predict(self, images: Sequence[ImageSource], task: str | None = None, top_k: int = 1,
                progress: bool = False, mode: str = "top1", fallback: bool = True,
                classes: Sequence[str] | None = None) -> list[dict]:
        """Answers for images (paths or PIL images), routed unless ``task`` is given; see
        :meth:`predict_features` and :meth:`predict_fused` for the keys."""
        if not self.names:
            raise RegistryError(f"the zoo at {self.root} has no experts yet: add one with 'clipzoo add-task'")
        if task is not None:
            self.record(task)
        feats = self.features(images, "encode", progress)
        preds = self.predict_features(feats, task, top_k, pixels=lambda idx: self.pixels([images[i] for i in idx]),
                                      mode=mode, fallback=fallback, classes=classes)
        self._add_source_weights(feats, preds, lambda idx: self.pixels([images[i] for i in idx]))
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

    # ----- fusion (see router.fusion) --------------------------------------------------------
    def dependents(self, name: str) -> list[str]:
        """Fusion experts that list ``name`` among their sources."""
        return [n for n, r in registry.read(self.root)["experts"].items() if name in r.get("sources", [])]

    def _add_fusion_task(self, data: TaskData | str | Path, name: str | None, kind: str,
                         sources: Sequence[str] | None, settings: dict | None, train: TrainSettings,
                         progress: bool) -> dict:
        """Compose existing experts for a new task: train only a fusion layer and a head."""
        t0 = time.perf_counter()
        if kind != FUSION_KIND:
            raise ConfigError(f"--from composes existing experts and needs --kind fusion, not {kind!r}")
        task, name = self._new_task(data, name, train)
        sources = list(dict.fromkeys(sources or self.names))
        if not sources:
            raise RegistryError(f"the zoo at {self.root} has no experts to compose yet: add tasks first")
        opts = dict((settings or {}).get(FUSION_KIND, {}))
        unknown = sorted((set(settings or {}) - {FUSION_KIND}) | (set(opts) - {"include_base"}))
        if unknown:
            raise ConfigError(f"unknown fusion settings {', '.join(unknown)}: fusion takes include_base")
        bb = self.backbone
        class_emb = bb.class_embeddings(task.classes, task.templates)
        expert = FusionExpert({s: self.expert(s) for s in sources}, task.classes, task.templates, class_emb,
                              bb.logit_scale, bb.fingerprint, bool(opts.get("include_base", True)),
                              {s: self.record(s)["sha256"] for s in sources}, seed=train.seed)
        return self._train_and_commit(expert, task, name, train, settings, progress, t0, verb="fuse",
                                      zero_shot=lambda x: x @ class_emb.T, extra={"sources": sources})

    fusion_settings = FusionSettings()
    fusion_info: dict = {}  # how the last global fusion was obtained (trained: loss, samples; or cached)

    def global_fusion(self, top_k: int) -> GlobalFusion:
        """The fusion layer over the routed top-k, trained on stored statistics the first time it is
        needed for this set of experts (then cached; the zoo directory is never written)."""
        settings = self.fusion_settings
        k = max(1, min(top_k, len(self.names)))
        key = fusion_key(self.registry["experts"], self.registry.get("router", {}), k, settings)
        if key not in self._fusions:
            names, dim = self.names, self.backbone.embed_dim
            self._fusions[key], self.fusion_info = load_or_train_global(
                (self.cache_root or default_root()) / "fusion", key, dim,
                lambda: train_global_fusion({i: self.expert(n) for i, n in enumerate(names)}, names,
                                            [self.stats(n) for n in names], lambda x: self.route(x, k),
                                            dim, settings))
        return self._fusions[key]

    def predict_fused(self, feats: torch.Tensor, top_k: int = 2,
                      pixels: Callable[[list[int]], torch.Tensor] | None = None, mode: str = "fusion",
                      fallback: bool = True, classes: Sequence[str] | None = None) -> list[dict]:
        """Task-agnostic answers combining the routed top-k experts: 'avg' (uniform average of their
        output distributions) or 'fusion' (the global AdapterFusion; each answer carries its fusion
        weights, expert -> weight). The answer is the best (task, class) over their classes; inputs
        of no known task fall back to zero-shot CLIP as in :meth:`predict_features`."""
        if mode not in MODES:
            raise ConfigError(f"unknown prediction mode {mode!r}: choose from {', '.join(MODES)}")
        if mode == "top1":
            return self.predict_features(feats, None, top_k, pixels, fallback=fallback, classes=classes)
        if top_k < 2:
            raise ConfigError(f"mode {mode!r} combines the router's top-k experts: use --top-k 2 or more")
        r = self.route(feats, top_k)
        cand = r.indices
        experts = {e: self.expert(r.names[e]) for e in cand.unique().tolist()}
        out = (average_predict(experts, r.names, cand, feats, pixels) if mode == "avg"
               else self.global_fusion(top_k).predict(experts, r.names, cand, r.weights, feats, pixels))
        preds = []
        for b, routing in enumerate(r.as_dicts()):
            e = int(cand[b, out["slot"][b]])
            p = {"task": r.names[e], "label": experts[e].classes[int(out["label"][b])],
                 "score": round(float(out["score"][b]), 6), "routing": routing}
            if mode == "fusion":
                p["fusion"] = {r.names[int(i)]: round(float(w), 6) for i, w in zip(cand[b], out["weights"][b])}
            preds.append({**p, "fallback": False})
        fell = r.fallback.tolist() if fallback else [False] * len(feats)
        return self._fall_back(preds, feats, fell, r.ood_score, classes)

    def _add_source_weights(self, feats: torch.Tensor, preds: list[dict],
                            pixels: Callable[[list[int]], torch.Tensor]) -> None:
        """Answers given by a composed fusion expert also carry its weights over its sources."""
        for name in {p["task"] for p in preds
                     if p["task"] is not None and self.record(p["task"])["kind"] == FUSION_KIND}:
            idx = [i for i, p in enumerate(preds) if p["task"] == name]
            exp = self.expert(name)
            for i, w in zip(idx, exp.fusion_weights(feats[idx], pixels(idx) if exp.needs_pixels else None)):
                preds[i]["sources"] = w

    # ----- the Hub (see zoo.hub) ------------------------------------------------------------
    def push_to_hub(self, repo_id: str, **kwargs) -> dict:
        """Upload this zoo in one commit; ``kwargs``: revision, private, message, dry_run, endpoint, token."""
        from zoo.hub import push

        return push(self.root, repo_id, **kwargs)

    @classmethod
    def from_hub(cls, repo_id: str, root: str | Path, cache_root: Path | None = None, **kwargs) -> "Zoo":
        """Pull ``repo_id`` into the zoo at ``root`` (created if absent) and open it; ``kwargs``:
        revision, only, force, endpoint, token."""
        from zoo.hub import pull

        pull(Path(root), repo_id, **kwargs)
        return cls.open(root, cache_root)


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
