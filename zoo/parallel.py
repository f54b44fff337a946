"""Beyond one process: several new tasks trained at once, and a large image set encoded in shards.

Two engines, both optional to the rest of clipzoo: local worker processes (``concurrent.futures``
with the ``spawn`` start method; nothing to install) and Ray Core (``pip install 'clipzoo[ray]'``),
where the same code runs on a laptop (``ray.init()``) and on a cluster (``ray.init(address=...)``).
Ray is imported only when asked for. Every Ray task declares its resources (``num_cpus``) and is
retried when its worker dies (``max_retries``); a task that raises is not retried (a bad data folder
stays bad) and comes back as one error line.

**Many tasks at once** (:func:`add_tasks`): each worker opens the zoo and runs the single-task
path, :meth:`clipzoo.zoo.learn.Learner.add_task`, unchanged: it stages its expert and commits it
under the zoo's lock (:meth:`clipzoo.zoo.store.Store.commit_expert`), so commits of concurrent
workers serialise, each is whole or absent, and one failing task loses nothing of the others. A
worker killed after its commit but before it answered is retried; the retry finds its expert
committed (same name, same data source) and reports it instead of adding it twice. A worker
killed before its commit leaves a staging folder whose lock nobody holds; the next writer
removes it.

**Encoding in shards** (:func:`encode_sharded`): the caller keys every image by content
(:mod:`clipzoo.zoo.cache`), looks them up in its feature cache, and sends only the misses, each
distinct content once, in contiguous shards to the workers; the features come back **through
Ray's object store** and the caller writes them into its cache in one transaction. Why not a
shared cache directory written by every worker: the cache index is SQLite in WAL mode, which
needs shared memory on one host and is not safe on network filesystems (NFS, SMB); and a feature
row (``embed_dim`` float32, 2 KiB for ViT-B/32) is far smaller than the image it comes from, so
returning it costs little. The workers read the images themselves, so image paths must be valid
on every node (a shared data directory); in-memory images travel with the task.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from clipzoo.errors import ClipzooError, ConfigError, RegistryError
from clipzoo.runtime import cache_root, disable_progress_bars, set_cache_root, set_threads
from clipzoo.tasks.spec import ImageSource, check_name

RAY_MISSING = "Ray is not installed: pip install 'clipzoo[ray]' (or use --executor local)"
EXECUTORS = ("local", "ray")
RETRIES = 3  # times Ray re-runs a task whose worker died


def import_ray():
    """The ``ray`` module, or one error line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator:
    """Ray, connected: to ``address`` (a running cluster, ``auto`` or ``ray://host:10001``), or a
    local instance on this machine's CPUs. A connection that already exists is reused and left
    open; one made here is closed on exit."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ConfigError(f"cannot start or reach {where}: {' '.join(str(e).split())[:300]}") from e
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def ray_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    return max(1, int(import_ray().cluster_resources().get("CPU", 1)))


def one_line(e: BaseException) -> str:
    """A task's failure as one line: the original exception's message when Ray wrapped it."""
    cause = getattr(e, "cause", None) or e
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, ClipzooError) else f"{type(cause).__name__}: {text}"[:500]


def ray_map(fn: Callable, calls: Sequence[tuple], num_cpus: float = 1, retries: int = RETRIES,
            raise_first: bool = True) -> list:
    """``[fn(*args) for args in calls]`` as Ray tasks (``num_cpus`` each, ``retries`` when a
    worker dies), in order. With ``raise_first=False`` a failed call gives its exception instead
    (the cause, when Ray wrapped it). Needs a Ray connection (:func:`ray_session`)."""
    ray = import_ray()
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=False)
    refs = [remote.remote(*args) for args in calls]
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - returned or raised below, never swallowed
            cause = getattr(e, "cause", None)
            err = cause if isinstance(cause, BaseException) else e
            if raise_first:
                for other in refs:
                    if other is not ref:
                        ray.cancel(other, force=True)
                raise err from None
            out.append(err)
    return out


def _worker_setup(cache: str | None, threads: int | None) -> None:
    """A worker's process switches: the caller's cache root (when on the same machine), threads,
    no progress bars."""
    if cache:
        set_cache_root(cache)
    set_threads(threads)
    disable_progress_bars()


# ----- many tasks at once ---------------------------------------------------------------------------
def check_jobs(jobs: Sequence[dict], existing: Sequence[str]) -> list[dict]:
    """Each job's name checked, unique among the jobs and new to the zoo."""
    names = [check_name(job["name"]) for job in jobs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"task name {twice[0]!r} is given twice: name each --data differently (--name)")
    known = [n for n in names if n in existing]
    if known:
        raise RegistryError(f"task {known[0]!r} already exists: choose another --name or remove it first")
    return list(jobs)


def _add_one(zoo_cls, root: str, job: dict, cache: str | None, threads: int | None) -> dict:
    """One worker's task: the single-task path, whole. Never raises: the outcome says what happened."""
    from clipzoo.tasks.data import load_task
    from clipzoo.tasks.spec import TaskData
    from clipzoo.zoo.train import TrainSettings

    name = job["name"]
    try:
        _worker_setup(cache, threads)
        data = job["data"]
        task = data if isinstance(data, TaskData) else load_task(data, name=name)
        zoo = zoo_cls.open(root)
        rec = zoo.registry["experts"].get(name)
        if rec is not None and rec.get("training", {}).get("data") == task.source:  # a retried worker
            return {"name": name, "ok": True, "record": rec, "note": "committed by an earlier attempt"}
        rec = zoo.add_task(task, name=name, kind=job.get("kind", "clip-adapter"), settings=job.get("settings"),
                           train=TrainSettings(**job.get("train", {})), sources=job.get("sources"))
        return {"name": name, "ok": True, "record": rec}
    except Exception as e:  # noqa: BLE001 - one task's failure is its outcome, the others go on
        return {"name": name, "ok": False, "error": one_line(e)}


def add_tasks(zoo_cls, root: Path, jobs: Sequence[dict], executor: str = "local", workers: int | None = None,
              address: str | None = None) -> list[dict]:
    """Train one expert per job in parallel and commit each as it finishes (see the module docstring).

    A job: ``{"name", "data" (a DIR, ``builtin:<domain>`` or a TaskData), "kind", "settings",
    "train" (TrainSettings fields), "sources"}``; only ``name`` and ``data`` are required.
    Returns one outcome per job, in order: ``{"name", "ok": True, "record"}`` or ``{"name", "ok":
    False, "error"}``. ``zoo_cls`` is the zoo class the workers open ``root`` with."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if not jobs:
        return []
    root = str(Path(root).resolve())
    if executor == "ray":
        with ray_session(address) as _:
            cache = str(cache_root()) if address is None else None  # a cluster's nodes use their own
            return ray_map(_add_one, [(zoo_cls, root, job, cache, 1) for job in jobs], num_cpus=1,
                           raise_first=False)
    n = min(len(jobs), workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // n)
    if n == 1:
        return [_add_one(zoo_cls, root, job, str(cache_root()), threads) for job in jobs]
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_add_one, zoo_cls, root, job, str(cache_root()), threads) for job in jobs]
        out = []
        for job, f in zip(jobs, futures):
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - a worker process that died (BrokenProcessPool)
                out.append({"name": job["name"], "ok": False, "error": one_line(e)})
        return out


# ----- encoding in shards ----------------------------------------------------------------------------
_backbones: dict[str, object] = {}  # fingerprint -> Backbone, per worker process


def worker_backbone(spec: dict, fingerprint: str):
    """The backbone ``spec`` names, loaded once per worker process; a node whose weights differ
    from the caller's (another fingerprint) is an error, never silently other features."""
    from clipzoo.errors import BackboneError
    from clipzoo.zoo.backbone import BackboneSpec, load_backbone

    if fingerprint not in _backbones:
        bb = load_backbone(BackboneSpec.from_dict(spec))
        if bb.fingerprint != fingerprint:
            raise BackboneError(f"backbone {spec} has fingerprint {bb.fingerprint[:12]} on this worker, "
                                f"{fingerprint[:12]} on the caller: give every node the same weights")
        _backbones[fingerprint] = bb
    return _backbones[fingerprint]


def _encode_shard(spec: dict, fingerprint: str, images: list, threads: int) -> torch.Tensor:
    """A worker's shard: frozen features of ``images``, no cache (the caller writes its own)."""
    from clipzoo.zoo.cache import encode_cached

    _worker_setup(None, threads)
    bb = worker_backbone(spec, fingerprint)
    with torch.no_grad():
        return encode_cached(images, bb.preprocess, bb.encode_images, None)


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ``[lo, hi)`` ranges covering ``range(n)`` (none empty)."""
    shards = max(1, min(shards, n))
    step, extra = divmod(n, shards)
    out, lo = [], 0
    for k in range(shards):
        hi = lo + step + (k < extra)
        out.append((lo, hi))
        lo = hi
    return out


def encode_sharded(bb, images: Sequence[ImageSource], shards: int | None = None, threads: int = 1) -> torch.Tensor:
    """Frozen features of ``images`` (rows in order), like :func:`clipzoo.zoo.cache.backbone_features`,
    with the images missing from the cache encoded by Ray workers in ``shards`` shards (default: the
    cluster's CPUs / ``threads``), each distinct content once. Needs a Ray connection
    (:func:`ray_session`)."""
    from clipzoo.zoo.cache import FeatureCache, _image_key

    cache = FeatureCache([bb.fingerprint, bb.preprocess_id])
    keys = [_image_key(im, cache) for im in images]
    cache.flush_keys()
    found = cache.get(keys)
    todo: dict[str, ImageSource] = {}
    for k, im in zip(keys, images):
        if k not in found and k not in todo:
            todo[k] = im
    if todo:
        items = list(todo.items())
        bounds = shard_bounds(len(items), shards or max(1, ray_cpus() // threads))
        spec = bb.spec.to_dict()
        parts = ray_map(_encode_shard, [(spec, bb.fingerprint, [im for _, im in items[lo:hi]], threads)
                                        for lo, hi in bounds], num_cpus=threads)
        feats = torch.cat(parts)
        new_keys = [k for k, _ in items]
        cache.put(new_keys, feats)
        found.update(zip(new_keys, feats))
    return torch.stack([found[k] for k in keys]) if keys else torch.empty(0)
