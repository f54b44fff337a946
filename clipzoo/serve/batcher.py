"""The micro-batcher: requests from many clients are queued; one worker thread takes up to
``max_batch`` images (or what arrived within ``max_wait_ms`` of the first), encodes them with the
frozen backbone in one forward pass, routes the batch and runs each routed expert once on its
sub-batch (:meth:`clipzoo.zoo.zoo.Zoo.predict_features`), then splits the answers back per request.

:func:`predict_batch` is that one step without the queue, so other engines (Ray Serve's
``@serve.batch``, :mod:`clipzoo.serve.ray_app`) run exactly the same code. Before each batch the
worker asks its :class:`clipzoo.serve.reload.ZooSource` for the current zoo, so a batch, and
every request in it, is answered wholly by one registry version.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from clipzoo.errors import ClipzooError

_log = logging.getLogger(__name__)
MODES = ("top1", "avg", "fusion")


class Unavailable(ClipzooError):
    """The zoo cannot answer yet (no experts): the server says 503, not 400."""


@dataclass(frozen=True)
class Options:
    """How a request wants its images answered (the options of ``clipzoo predict``)."""

    top_k: int = 1
    mode: str = "top1"
    fallback: bool = True
    classes: tuple[str, ...] | None = None
    task: str | None = None


@dataclass
class Job:
    """One request's images as preprocessed pixels ``(n, 3, H, W)``, their names and options."""

    pixels: torch.Tensor
    paths: list[str]
    options: Options = Options()
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a future unless its client gave up (a cancelled future is left alone)."""
    try:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)
    except InvalidStateError:  # cancelled meanwhile by the client's side
        pass


def _version(zoo: Any) -> int:
    return int(zoo.registry.get("router", {}).get("version", 0))


def _add_source_weights(zoo: Any, feats: torch.Tensor, preds: list[dict], pixels: Callable) -> None:
    """Answers given by a composed expert carry its weights over its sources, as ``Zoo.predict`` does."""
    for name in dict.fromkeys(p.get("task") for p in preds if p.get("task") is not None):
        exp = zoo.expert(name)
        if not getattr(exp, "composed", False):
            continue
        idx = [i for i, p in enumerate(preds) if p.get("task") == name]
        with torch.no_grad():
            weights = exp.source_weights(feats[idx], pixels(idx) if exp.needs_pixels else None)
        for i, w in zip(idx, weights):
            preds[i]["sources"] = w


def predict_batch(zoo: Any, jobs: Sequence[tuple[torch.Tensor, Options]]) -> list[list[dict] | BaseException]:
    """Answers for a batch of requests, each ``(pixels, options)``: one backbone forward over all
    their images, then, per distinct options, one ``predict_features`` call (which runs each routed
    expert once on its sub-batch, the in-encoder ones in one shared tower pass). A failure of one group of
    options is returned in place of the answers of its requests; the others are answered."""
    if not jobs:
        return []
    if not zoo.names:
        err = Unavailable(f"the zoo at {zoo.root} has no experts yet: add one with 'clipzoo add-task'")
        return [err for _ in jobs]
    pixels = torch.cat([p for p, _ in jobs])
    feats = zoo.backbone.encode_images(pixels)
    starts, pos = [], 0
    for p, _ in jobs:
        starts.append(pos)
        pos += int(p.shape[0])
    groups: dict[Options, list[int]] = {}
    for j, (_, opts) in enumerate(jobs):
        groups.setdefault(opts, []).append(j)
    out: list[list[dict] | BaseException] = [[] for _ in jobs]
    for opts, members in groups.items():
        rows = [starts[j] + r for j in members for r in range(int(jobs[j][0].shape[0]))]
        sub_feats, sub_pix = feats[rows], pixels[rows]
        pix_fn = lambda idx, px=sub_pix: px[list(idx)]  # noqa: E731
        try:
            preds = zoo.predict_features(sub_feats, opts.task, opts.top_k, pixels=pix_fn, mode=opts.mode,
                                         fallback=opts.fallback, classes=list(opts.classes) if opts.classes else None)
            _add_source_weights(zoo, sub_feats, preds, pix_fn)
        except Exception as e:  # noqa: BLE001 - one group's failure is its requests' answer
            for j in members:
                out[j] = e
            continue
        pos = 0
        for j in members:
            n = int(jobs[j][0].shape[0])
            out[j] = preds[pos:pos + n]
            pos += n
    return out


class MicroBatcher:
    """A queue and one worker thread answering :class:`Job` s in micro-batches.

    ``source()`` returns the zoo to use for the next batch (hot reload happens there). A job's
    future gets ``{"zoo_version", "predictions"}`` (each prediction a ``predict --json`` dict with
    the job's paths) or the exception that stopped its answers."""

    def __init__(self, source: Callable[[], Any], max_batch: int = 32, max_wait_ms: float = 10.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.source, self.max_batch, self.max_wait = source, max_batch, max_wait_ms / 1000
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"batches": 0, "images": 0, "requests": 0, "failed_batches": 0, "largest_batch": 0}

    # ----- lifecycle --------------------------------------------------------------------------
    def start(self) -> "MicroBatcher":
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="clipzoo-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; queued jobs fail with a one-line error."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            while self._queue:
                _settle(self._queue.popleft().future, error=Unavailable("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> Future:
        """Queue a job; its future is completed by the worker."""
        with self._cond:
            if self._stop:
                raise Unavailable("the server is shutting down")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    # ----- the worker -------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """Wait for a first job, then gather more until ``max_batch`` images or ``max_wait``."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            batch = [self._queue.popleft()]
            n = batch[0].n
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch:
                if self._queue:
                    if n + self._queue[0].n > self.max_batch:
                        break
                    batch.append(self._queue.popleft())
                    n += batch[-1].n
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._answer(batch)
            except BaseException as e:  # noqa: BLE001 - the worker never dies of one batch
                _log.exception("batch of %d requests failed", len(batch))
                self.stats["failed_batches"] += 1
                for job in batch:
                    _settle(job.future, error=e)

    def _answer(self, batch: list[Job]) -> None:
        zoo = self.source()  # a batch is answered by one registry version
        version = _version(zoo)
        results = predict_batch(zoo, [(j.pixels, j.options) for j in batch])
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        n = sum(j.n for j in batch)
        self.stats["images"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        for job, res in zip(batch, results):
            if isinstance(res, BaseException):
                _settle(job.future, error=res)
            else:
                preds = [{"path": p, **r} for p, r in zip(job.paths, res)]
                _settle(job.future, {"zoo_version": version, "predictions": preds})
