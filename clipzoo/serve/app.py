"""The HTTP routes of ``clipzoo serve``: ``POST /predict``, ``GET /health``, ``GET /version``,
``GET /openapi.json``; and :class:`Running`, a server on a thread (tests, benchmarks).

A request is read with a byte limit, its images decoded and checked in the handler (a worker
thread, off the event loop) and only then queued for the micro-batcher, so a bad image costs its
own request a 4xx and never touches the batch the others share. Each answer is
``{"zoo_version", "predictions"}``: the list ``clipzoo predict --json`` prints, from one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clipzoo.errors import ClipzooError
from clipzoo.serve.batcher import Job, MicroBatcher, Unavailable
from clipzoo.serve.inputs import BadRequest, Decoder, Limits, check_count, parse_json, parse_options
from clipzoo.serve.reload import ZooSource
from clipzoo.serve.schema import openapi

_log = logging.getLogger(__name__)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(reason).split()) or "error"}, status_code=status)


def failure_response(e: Exception) -> JSONResponse:
    """The one-line JSON answer to a request that failed with ``e`` (this server and the Ray
    Serve deployment alike): its own fault 4xx, an unready zoo 503, anything else a logged 500."""
    if isinstance(e, BadRequest):
        return _error(e.status, str(e))
    if isinstance(e, Unavailable):
        return _error(503, str(e))
    if isinstance(e, ClipzooError):  # an unknown task, bad fallback classes, ...: the request's own fault
        return _error(400, str(e))
    _log.error("predict failed", exc_info=e)
    return _error(500, f"internal error ({type(e).__name__}: {e})")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``max_bytes``, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"the request body is {int(declared):,} bytes, over the limit of {max_bytes:,}: "
                              "send fewer or smaller images (or start the server with a larger --max-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"the request body is over the limit of {max_bytes:,} bytes: send fewer or smaller "
                                  "images (or start the server with a larger --max-bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise BadRequest(400, "empty request body: send multipart files or JSON {\"images\": [base64, ...]}")
    return body


async def _multipart(request: Request, body: bytes, limits: Limits) -> tuple[list[tuple[str, bytes]], dict]:
    """Files (any field name) and option fields of a multipart body already read."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_images + 1, max_fields=32)
    except Exception as e:  # noqa: BLE001 - starlette's parser errors, whatever their class
        raise BadRequest(400, f"malformed multipart body ({getattr(e, 'detail', None) or e})") from None
    items, fields = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((value.filename or f"<image {len(items)}>", await value.read()))
            else:
                fields[key] = value
    finally:
        await form.close()
    check_count(len(items), limits)
    return items, fields


class Service:
    """The state behind the routes: the zoo source, the batcher, the decoder and the limits."""

    def __init__(self, source: ZooSource, max_batch: int = 32, max_wait_ms: float = 10.0,
                 limits: Limits = Limits()):
        self.source, self.limits = source, limits
        self.batcher = MicroBatcher(source, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.decoder = Decoder()
        self.started = time.time()

    async def predict(self, request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, self.limits.max_bytes)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json":
                items, fields = parse_json(body, self.limits)
            elif ctype == "multipart/form-data":
                items, fields = await _multipart(request, body, self.limits)
            elif ctype.startswith("image/") or ctype == "application/octet-stream":
                items, fields = [("<image 0>", body)], {}
            else:
                raise BadRequest(415, f"unsupported content type {ctype or 'none'!r}: send multipart/form-data files, "
                                      "application/json with base64 images, or one image/* body")
            options = parse_options({**dict(request.query_params), **fields})
            preprocess = self.source.zoo.backbone.preprocess  # one backbone for every version of a zoo
            pixels = await run_in_threadpool(self.decoder.pixels, items, preprocess)
            job = Job(pixels, [name for name, _ in items], options)
            result = await asyncio.wrap_future(self.batcher.submit(job))
        except Exception as e:  # noqa: BLE001 - the server answers and goes on
            return failure_response(e)
        return JSONResponse(result, headers={"X-Clipzoo-Version": str(result["zoo_version"])})

    async def health(self, request: Request) -> JSONResponse:
        ok = self.batcher.alive
        return JSONResponse({"status": "ok" if ok else "down", "zoo_version": self.source.version,
                             "queued": self.batcher.queued, "uptime_s": round(time.time() - self.started, 3),
                             **self.batcher.stats}, status_code=200 if ok else 503)

    async def version(self, request: Request) -> JSONResponse:
        return JSONResponse(self.source.info())

    async def schema(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher.start()
        try:
            yield
        finally:
            self.batcher.stop()
            self.decoder.close()

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/predict", self.predict, methods=["POST"]),
                                 Route("/health", self.health, methods=["GET"]),
                                 Route("/version", self.version, methods=["GET"]),
                                 Route("/openapi.json", self.schema, methods=["GET"])],
                         lifespan=self.lifespan)


def create_app(zoo_dir: Any, max_batch: int = 32, max_wait_ms: float = 10.0, limits: Limits = Limits(),
               source: ZooSource | None = None) -> Starlette:
    """The Starlette app serving the zoo at ``zoo_dir`` (opened and warmed now)."""
    return Service(source or ZooSource(zoo_dir), max_batch, max_wait_ms, limits).app()


class Running:
    """A uvicorn server for ``app`` on a thread: ``with Running(app) as srv: srv.url``. Port 0 picks
    a free port; leaving the block stops the server and waits for it."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="clipzoo-serve", daemon=True)
        self.timeout = timeout
        self.url = ""

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()
