"""The same service on Ray Serve, to scale out over replicas and machines (not tested here: Ray is
not a dependency of clipzoo; ``pip install 'ray[serve]'``).

Each replica opens the zoo (:class:`clipzoo.serve.reload.ZooSource`, so hot reload works per
replica), decodes and checks images in the request like ``clipzoo serve`` does, and Ray's
``@serve.batch`` gathers requests into the same :func:`clipzoo.serve.batcher.predict_batch` call:
one backbone pass per batch, one expert call per routed sub-batch. Run::

    from clipzoo.serve.ray_app import deployment
    from ray import serve
    serve.run(deployment("myzoo", replicas=4, max_batch=32, max_wait_ms=10), route_prefix="/")

``POST /predict`` takes the JSON form (``{"images": [base64, ...], ...}``) and answers like the
single-process server.
"""

from __future__ import annotations

from typing import Any

from clipzoo.errors import ClipzooError, ConfigError


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise ConfigError("Ray Serve is not installed: pip install 'ray[serve]' (clipzoo serve runs without it)") from None
    return serve


def deployment(zoo_dir: str, replicas: int = 1, max_batch: int = 32, max_wait_ms: float = 10.0,
               max_images: int = 64, max_bytes: int = 64 << 20) -> Any:
    """A bound Ray Serve application serving the zoo at ``zoo_dir`` (pass it to ``serve.run``)."""
    serve = _ray_serve()
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from clipzoo.serve.batcher import Job, Unavailable, predict_batch
    from clipzoo.serve.inputs import BadRequest, Decoder, Limits, parse_json, parse_options
    from clipzoo.serve.reload import ZooSource, router_version

    @serve.deployment(num_replicas=replicas)
    class ClipzooDeployment:
        def __init__(self, root: str) -> None:
            self.source = ZooSource(root)
            self.decoder = Decoder()
            self.limits = Limits(max_images=max_images, max_bytes=max_bytes)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def _batch(self, jobs: list[Job]) -> list[Any]:
            zoo = self.source()  # one registry version per batch
            version = router_version(zoo)
            results = predict_batch(zoo, [(j.pixels, j.options) for j in jobs])
            return [r if isinstance(r, BaseException) else
                    {"zoo_version": version, "predictions": [{"path": p, **x} for p, x in zip(j.paths, r)]}
                    for j, r in zip(jobs, results)]

        async def __call__(self, request: Request) -> JSONResponse:
            try:
                body = await request.body()
                if len(body) > self.limits.max_bytes:
                    raise BadRequest(413, f"the request body is over the limit of {self.limits.max_bytes:,} bytes")
                if not body:
                    raise BadRequest(400, "empty request body: send JSON {\"images\": [base64, ...]}")
                items, fields = parse_json(body, self.limits)
                options = parse_options({**dict(request.query_params), **fields})
                pixels = self.decoder.pixels(items, self.source.zoo.backbone.preprocess)
                result = await self._batch(Job(pixels, [n for n, _ in items], options))
                if isinstance(result, BaseException):
                    raise result
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except Unavailable as e:
                return JSONResponse({"error": str(e)}, status_code=503)
            except ClipzooError as e:
                return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)
            return JSONResponse(result)

    return ClipzooDeployment.bind(zoo_dir)
