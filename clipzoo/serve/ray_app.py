"""The same service on Ray Serve, to scale out over replicas and machines. Ray Serve is the
optional extra ``pip install -e '.[ray]'`` (``ray[serve]``); ``clipzoo serve`` runs without it.
``tests/test_ray_serve.py`` runs this deployment on a local Ray instance and checks its answers
against ``Zoo.predict``.

Each replica opens the zoo (:class:`clipzoo.serve.reload.ZooSource`, so hot reload works per
replica), decodes and checks images in the request like ``clipzoo serve`` does (off the replica's
event loop), and Ray's ``@serve.batch`` gathers requests into the same
:func:`clipzoo.serve.batcher.predict_batch` call: one backbone pass per batch, one expert call per
routed sub-batch. Unlike ``clipzoo serve``, ``max_batch`` counts requests, not images (that is how
``@serve.batch`` counts); a replica takes up to ``2 * max_batch`` requests at once so that a batch
can fill while the previous one runs. Run::

    from clipzoo.serve.ray_app import deployment
    from ray import serve
    serve.run(deployment("myzoo", replicas=4, max_batch=32, max_wait_ms=10), route_prefix="/")

Any path of the route prefix takes ``POST`` with the JSON form (``{"images": [base64, ...], ...}``,
options as JSON fields or query parameters) and answers like the single-process server:
``{"zoo_version", "predictions"}`` with an ``X-Clipzoo-Version`` header, or ``{"error": "<one line>"}``
with a 4xx (the request's fault), 503 (no experts yet) or 500.
"""

from __future__ import annotations

import asyncio
from typing import Any

from clipzoo.errors import ConfigError


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise ConfigError("Ray Serve is not installed: pip install -e '.[ray]' (clipzoo serve runs without it)") from None
    return serve


def deployment(zoo_dir: str, replicas: int = 1, max_batch: int = 32, max_wait_ms: float = 10.0,
               max_images: int = 64, max_bytes: int = 64 << 20) -> Any:
    """A bound Ray Serve application serving the zoo at ``zoo_dir`` (pass it to ``serve.run``)."""
    if replicas < 1 or max_batch < 1 or max_wait_ms < 0:
        raise ConfigError(f"replicas and max_batch must be >= 1 and max_wait_ms >= 0 (got {replicas}, {max_batch}, "
                          f"{max_wait_ms})")
    serve = _ray_serve()
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from clipzoo.serve.app import failure_response
    from clipzoo.serve.batcher import Job, predict_batch
    from clipzoo.serve.inputs import BadRequest, Decoder, Limits, parse_json, parse_options
    from clipzoo.serve.reload import ZooSource, router_version

    limits = Limits(max_images=max_images, max_bytes=max_bytes)  # checked here, not in a replica

    # Ray caps the requests a replica holds at once (default 5): below max_batch, batches never fill.
    @serve.deployment(num_replicas=replicas, max_ongoing_requests=2 * max_batch)
    class ClipzooDeployment:
        def __init__(self, root: str) -> None:
            self.source = ZooSource(root)
            self.decoder = Decoder()
            self.limits = limits

        def __del__(self) -> None:
            decoder = getattr(self, "decoder", None)
            if decoder is not None:
                decoder.close()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def _batch(self, jobs: list[Job]) -> list[Any]:
            return await asyncio.to_thread(self._answer, jobs)

        def _answer(self, jobs: list[Job]) -> list[Any]:
            zoo = self.source()  # one registry version per batch
            version = router_version(zoo)
            results = predict_batch(zoo, [(j.pixels, j.options) for j in jobs])
            return [r if isinstance(r, BaseException) else
                    {"zoo_version": version, "predictions": [{"path": p, **x} for p, x in zip(j.paths, r)]}
                    for j, r in zip(jobs, results)]

        async def __call__(self, request: Request) -> JSONResponse:
            try:
                if request.method != "POST":
                    raise BadRequest(405, f"{request.method} is not served: POST JSON {{\"images\": [base64, ...]}}")
                body = await request.body()
                if len(body) > self.limits.max_bytes:
                    raise BadRequest(413, f"the request body is {len(body):,} bytes, over the limit of "
                                          f"{self.limits.max_bytes:,}: send fewer or smaller images")
                if not body:
                    raise BadRequest(400, "empty request body: send JSON {\"images\": [base64, ...]}")
                items, fields = parse_json(body, self.limits)
                options = parse_options({**dict(request.query_params), **fields})
                preprocess = self.source.zoo.backbone.preprocess  # one backbone for every version of a zoo
                pixels = await asyncio.to_thread(self.decoder.pixels, items, preprocess)
                result = await self._batch(Job(pixels, [n for n, _ in items], options))
                if isinstance(result, BaseException):
                    raise result
            except Exception as e:  # noqa: BLE001 - the replica answers and goes on
                return failure_response(e)
            return JSONResponse(result, headers={"X-Clipzoo-Version": str(result["zoo_version"])})

    return ClipzooDeployment.bind(zoo_dir)
