"""Adding a task: build a fresh expert, fit it on cached frozen features, score it, commit it.

:class:`Learner` is the part of :class:`clipzoo.zoo.zoo.Zoo` that trains; it works on a
:class:`clipzoo.zoo.store.Store` and never touches an existing expert's files.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Sequence

import torch

from clipzoo.errors import ConfigError, RegistryError
from clipzoo.router.stats import compute_stats
from clipzoo.tasks.data import load_task
from clipzoo.tasks.metrics import accuracy
from clipzoo.tasks.spec import TaskData, check_name
from clipzoo.zoo import leases, registry
from clipzoo.zoo.experts import Expert, build_expert
from clipzoo.zoo.commit import WRITE_FAILURES, WriteError, write_error
from clipzoo.zoo.train import TrainSettings, fit


class Learner:
    """``add_task`` for a :class:`clipzoo.zoo.store.Store` (mixed into ``Zoo``)."""

    fusion_at_add: bool = True  # train the zoo-wide fusion ahead for the k fusion mode was used with

    def add_task(self, data: TaskData | str | Path, name: str | None = None, kind: str = "clip-adapter",
                 settings: dict | None = None, train: TrainSettings = TrainSettings(),
                 sources: Sequence[str] | None = None) -> dict:
        """Train a fresh expert for a new task and commit it atomically; other experts are untouched.

        Any failure (bad data, bad settings, an interrupted write) leaves the zoo as it was.
        ``kind='fusion'`` composes existing experts (``sources``, default all) instead.
        """
        t0 = time.perf_counter()
        task = data if isinstance(data, TaskData) else load_task(data, name=name)
        name = check_name(name or task.name)
        if name in self.registry["experts"]:
            raise RegistryError(f"task {name!r} already exists in {self.root}: choose another --name or remove it first")
        if not isinstance(train, TrainSettings):
            raise ConfigError(f"train must be a TrainSettings, not {type(train).__name__}")
        train.check()
        expert = build_expert(kind, self.backbone, task.classes, task.templates, settings,
                              sources=list(sources) if sources else None, zoo=self.sources(), seed=train.seed)
        return self._train_and_commit(expert, task, name, train, settings, t0)

    def add_tasks(self, jobs: Sequence[dict], executor: str = "local", workers: int | None = None,
                  address: str | None = None) -> list[dict]:
        """Several new tasks at once, trained in parallel (worker processes, or Ray with
        ``executor='ray'``), each through :meth:`add_task` and committed on its own; one outcome per
        job, in order (:func:`clipzoo.zoo.parallel.add_tasks` has the job and outcome layout)."""
        from clipzoo.zoo.parallel import add_tasks, check_jobs

        outcomes = add_tasks(type(self), self.root, check_jobs(jobs, list(self.registry["experts"])),
                             executor, workers, address)
        self.registry = registry.read(self.root)  # the version with the workers' commits
        return outcomes

    def _train_and_commit(self, expert: Expert, task: TaskData, name: str, train: TrainSettings,
                          settings: dict | None, t0: float) -> dict:
        """Fit ``expert`` on the task's cached features, score it on the test split, stage its files
        with their stats and commit it atomically. Returns the registry record."""
        x_train = self.features(task.train.images, f"encode {name}/train")
        y_train = torch.tensor(task.train.labels)
        inputs = (x_train, self.pixels(task.train.images)) if expert.needs_pixels else (x_train,)
        history = fit(expert, inputs, y_train, train, desc=f"train {name}", criterion=expert.criterion)
        metrics = {k: round(v, 6) for k, v in history.items()}
        if len(task.test):
            x_test = self.features(task.test.images, f"encode {name}/test")
            test_in = (x_test, self.pixels(task.test.images)) if expert.needs_pixels else (x_test,)
            y_test = torch.tensor(task.test.labels)
            with torch.no_grad():
                metrics["test_acc"] = round(accuracy(expert(*test_in).argmax(1), y_test), 6)
                metrics["zero_shot_acc"] = round(accuracy(expert.zero_shot(x_test).argmax(1), y_test), 6)
        n_params = expert.trainable_params()
        record = {
            "name": name,
            "kind": expert.kind,
            **expert.record_fields(),
            "classes": task.classes,
            "templates": task.templates,
            "files": {},
            "sha256": "",
            "trainable_params": n_params,
            "trainable_share": n_params / self.backbone.num_params,
            "training": {**train.to_dict(), "data": task.source, "n_train": len(task.train),
                         "n_test": len(task.test), "settings": settings or {}},
            "metrics": metrics,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        staging, held = leases.new_staging(self.root)  # its lock tells later writers this writer is alive
        try:
            written = expert.save_pretrained(staging) + [compute_stats(x_train, y_train, len(task.classes)).save(staging)]
            record["files"] = {f: registry.sha256_file(staging / f) for f in written}
            record["sha256"] = record["files"]["weights.safetensors"]
            record["metrics"]["add_seconds"] = round(time.perf_counter() - t0, 3)
            self.commit_expert(name, staging, record, t0)
        except WriteError:
            raise
        except WRITE_FAILURES as e:  # the staged files could not be written: the zoo is untouched
            raise write_error(self.root, e) from e
        finally:
            leases.drop_staging(self.root, staging, held)
        self._experts[name] = (record["sha256"], expert.eval())
        if self.fusion_at_add:
            self._prepare_fusion(name, record, t0)
        return record

    def _prepare_fusion(self, name: str, record: dict, t0: float) -> None:
        """Train (or find cached) the zoo-wide fusion now for every ``k`` fusion mode was used with
        on this zoo (:meth:`fusion_ks`), so that the next ``predict --mode fusion`` trains nothing;
        its time goes into ``add_seconds``. Nothing for a zoo that never used fusion mode, for
        fewer than two experts, or when an expert works inside the image encoder (fusion mode
        refuses those)."""
        ks = self.fusion_ks()
        if not ks or len(self.names) < 2 or any(self.expert(n).needs_pixels for n in self.names):
            return
        t_fusion = time.perf_counter()
        for k in ks:
            self.global_fusion(k)
        metrics = {"fusion_seconds": round(time.perf_counter() - t_fusion, 3),
                   "add_seconds": round(time.perf_counter() - t0, 3)}
        record["metrics"].update(metrics)
        with registry.lock(self.root):  # the same record with its full time; nothing else changes
            reg = registry.read(self.root)
            rec = reg["experts"].get(name)
            if rec is None or rec["sha256"] != record["sha256"]:
                return
            rec["metrics"].update(metrics)
            registry.write(self.root, reg)
            if self.registry.get("router") == reg.get("router"):
                self.registry = reg
