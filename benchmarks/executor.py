"""Where the benchmark's independent runs execute: in this process, or as Ray tasks.

:func:`clipzoo.bench.harness.run_benchmark` encodes every image once, tunes the baselines once,
then hands its (order, seed) runs to an executor and merges what comes back into one report:

- :class:`LocalExecutor` (the default; imports no Ray): each run in turn, in this process.
- :class:`RayExecutor` (``clipzoo bench --executor ray [--address ADDR]``; ``pip install
  'clipzoo[ray]'``): each run is one Ray task declaring ``num_cpus = settings.threads``. The
  tasks, their cached features, the settings and the holdout go to the object store once; each
  worker loads the backbone from its spec (and refuses other weights: the fingerprint must match)
  and runs the very function the local executor runs, on the same seeds, so the accuracy
  matrices are identical. The features are encoded in shards across the workers
  (:func:`clipzoo.zoo.parallel.encode_sharded`) and, on a node whose feature cache lacks them,
  written into that cache before the run, so no node encodes an image again.

Faults: a task whose worker dies (killed, out of memory, a lost node) is retried by Ray
(``max_retries``). Every run checkpoints its finished steps (:mod:`clipzoo.bench.resume`) and
marks its folder with this sweep's token when it starts; a retried attempt finds its own token
there and resumes from the finished steps instead of starting over. A run's result reaches the
driver only as its task's return value, once per run id (checked), and the report is written by
the driver only after every run returned, so nothing half-written reaches it. A run that raises
(bad data, a bad setting) is not retried: the sweep stops with its one-line error and
``--resume`` continues it later. ``--out`` (the runs' folders and zoos) must be a path every node
can write at the same place: a shared filesystem.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipzoo.errors import ConfigError
from clipzoo.runtime import cache_root
from clipzoo.zoo import parallel

__all__ = ["RunJob", "LocalExecutor", "RayExecutor", "make_executor", "EXECUTORS"]

EXECUTORS = parallel.EXECUTORS
MARKER = "attempt.json"  # in a run's folder: the token of the sweep that started it


@dataclass(frozen=True)
class RunJob:
    """One independent run of a sweep: its id, task order (indices), seed and folders."""
    rid: str
    order: list[int]
    seed: int
    run_dir: Path
    zoo_dir: Path


class LocalExecutor:
    """Every run in turn, in this process: the harness as it always ran."""

    name = "local"

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def describe(self) -> dict:
        return {"executor": self.name}

    def encode(self, encode_fn: Callable, tasks: list, bb) -> list:
        return encode_fn(tasks, bb)

    def runs(self, run_fn: Callable, jobs: list[RunJob], tasks: list, feats: list, bb, settings, resume: bool,
             held) -> list[dict]:
        return [run_fn(j.rid, j.order, j.seed, tasks, feats, bb, settings, j.run_dir, j.zoo_dir, resume, held)
                for j in jobs]


class RayExecutor:
    """Each run a Ray task (see the module docstring). ``address``: a running cluster (``auto``,
    ``HOST:6379`` or ``ray://HOST:10001``); None starts a local instance, or uses the connection
    this process already has. ``retries``: Ray's ``max_retries`` for a worker that dies."""

    name = "ray"

    def __init__(self, address: str | None = None, retries: int = parallel.RETRIES, shards: int | None = None):
        self.address, self.retries, self.shards = address, retries, shards
        self._session = None

    def __enter__(self) -> "RayExecutor":
        self._session = parallel.ray_session(self.address)
        self._session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.__exit__(*exc)

    def describe(self) -> dict:
        return {"executor": self.name, "address": self.address, "cluster_cpus": parallel.ray_cpus(),
                "max_retries": self.retries}

    def encode(self, encode_fn: Callable, tasks: list, bb) -> list:
        """The same ``(train features, labels, test features, labels)`` per task as the local
        ``encode_fn``, every image of every task encoded in one sharded pass."""
        import torch

        images = [im for t in tasks for split in (t.train, t.test) for im in split.images]
        feats = parallel.encode_sharded(bb, images, self.shards)
        out, at = [], 0
        for t in tasks:
            n, m = len(t.train), len(t.test)
            out.append((feats[at:at + n], torch.tensor(t.train.labels), feats[at + n:at + n + m],
                        torch.tensor(t.test.labels)))
            at += n + m
        return out

    def runs(self, run_fn: Callable, jobs: list[RunJob], tasks: list, feats: list, bb, settings, resume: bool,
             held) -> list[dict]:
        ray = parallel.import_ray()
        local = self.address is None
        shared = ray.put({"tasks": tasks, "feats": feats, "settings": settings, "held": held,
                          "spec": bb.spec.to_dict(), "fingerprint": bb.fingerprint,
                          "cache": str(cache_root()) if local else None})
        token = uuid.uuid4().hex
        results = parallel.ray_map(run_on_worker, [(run_fn, job, shared, resume, token) for job in jobs],
                                   num_cpus=_cpus(settings), retries=self.retries)
        ids = [r["id"] for r in results]
        if sorted(ids) != sorted(j.rid for j in jobs) or len(set(ids)) != len(ids):
            raise ConfigError(f"the workers returned runs {ids} for {[j.rid for j in jobs]}: refusing to merge")
        return results


def _cpus(settings) -> int:
    """CPUs a run declares: its torch threads (or the full fine-tuning baselines' own, when more)."""
    return max(settings.threads, getattr(settings, "ft_threads", 0) or 0)


def run_on_worker(run_fn: Callable, job: RunJob, shared, resume: bool, token: str) -> dict:
    """One run on a Ray worker: the caller's switches, its backbone, its features in this node's
    cache, then ``run_fn`` as the local executor calls it; resumed when this is a retried attempt
    of the same sweep (the marker in the run's folder holds ``token``)."""
    if not isinstance(shared, dict):  # a reference passed inside a tuple arrives unresolved
        shared = parallel.import_ray().get(shared)
    s = shared["settings"]
    parallel._worker_setup(shared["cache"], s.threads)
    bb = parallel.worker_backbone(shared["spec"], shared["fingerprint"])
    _seed_cache(bb, shared["tasks"], shared["feats"])
    marker = Path(job.run_dir) / MARKER
    retried = marker.is_file() and json.loads(marker.read_text()).get("token") == token
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    from clipzoo.zoo.registry import atomic_write_bytes

    atomic_write_bytes(marker, json.dumps({"token": token}).encode())
    return run_fn(job.rid, job.order, job.seed, shared["tasks"], shared["feats"], bb, s, Path(job.run_dir),
                  Path(job.zoo_dir), resume or retried, shared["held"])


def _seed_cache(bb, tasks: list, feats: list) -> None:
    """Write the shipped features of the images this node's feature cache lacks (none when the
    node shares the caller's cache), so the zoo's ``add_task`` finds them instead of encoding."""
    import torch

    from clipzoo.zoo.cache import FeatureCache, _image_key

    cache = FeatureCache([bb.fingerprint, bb.preprocess_id])
    images = [im for t in tasks for split in (t.train, t.test) for im in split.images]
    rows = torch.cat([x for f in feats for x in (f[0], f[2])])
    keys = [_image_key(im, cache) for im in images]
    cache.flush_keys()
    have = cache.get(keys)
    missing = {k: i for i, k in enumerate(keys) if k not in have}
    if missing:
        cache.put(list(missing), rows[list(missing.values())])


def make_executor(name: str = "local", address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor called ``name`` (``--executor``); ``address`` only with Ray."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if name == "local":
        if address:
            raise ConfigError("--address needs --executor ray")
        return LocalExecutor()
    parallel.import_ray()  # one line now, rather than after the encoding
    return RayExecutor(address)
