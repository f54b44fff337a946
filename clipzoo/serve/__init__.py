"""``clipzoo serve``: one warm process answering many clients, micro-batched and grouped by expert.

Why Starlette on uvicorn: both are small, well kept (encode / Kludex), async, and everything the
service needs (routing, multipart, streaming bodies with a byte limit, a lifespan for the batch
worker) without a framework on top; FastAPI would add pydantic models for four routes, LitServe
its own batching loop, where ours must group a batch by routed expert. The OpenAPI document is
written by hand (:mod:`clipzoo.serve.schema`). Install with ``pip install 'clipzoo[serve]'``.

- :mod:`clipzoo.serve.batcher`: the micro-batcher and :func:`predict_batch` (one backbone pass,
  one expert call per routed sub-batch);
- :mod:`clipzoo.serve.reload`: hot reload when another process changes the zoo;
- :mod:`clipzoo.serve.inputs`: request limits and image checks, before a request joins a batch;
- :mod:`clipzoo.serve.app`: the routes; :mod:`clipzoo.serve.ray_app`: the same on Ray Serve;
- :mod:`clipzoo.serve.bench`: ``clipzoo bench-serve``.
"""
