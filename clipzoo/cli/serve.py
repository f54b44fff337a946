"""Leaf commands of the service: ``serve`` and ``bench-serve`` (need ``pip install 'clipzoo[serve]'``)."""

from __future__ import annotations

import click

from clipzoo.cli.options import at_least_one, emit, existing_zoo_option, json_option
from clipzoo.errors import ConfigError


def _need_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
        import multipart  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"clipzoo serve needs the 'serve' extra ({e.name} is missing): "
                          "pip install 'clipzoo[serve]'") from None


@click.command()
@existing_zoo_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--max-batch", default=32, show_default=True, type=int, callback=at_least_one,
              help="Most images per micro-batch.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="Longest wait for a batch to fill after its first request.")
@click.option("--max-images", default=64, show_default=True, type=int, callback=at_least_one,
              help="Most images per request (more: 413).")
@click.option("--max-bytes", default=64 << 20, show_default=True, type=int, callback=at_least_one,
              help="Most bytes per request body (more: 413). Per-image limits: $CLIPZOO_MAX_IMAGE_PIXELS/BYTES.")
def serve(zoo_dir: str, host: str, port: int, max_batch: int, max_wait_ms: float, max_images: int,
          max_bytes: int) -> None:
    """Serve the zoo over HTTP: POST /predict (multipart files or JSON base64 images) answers
    like 'predict --json'; GET /health, /version, /openapi.json. Requests from all clients are
    micro-batched; when another process adds or removes a task the server moves to the new zoo
    version between batches, without a restart.

    \b
    Example: clipzoo serve --zoo myzoo --port 8000
             curl -F file=@photo.png http://127.0.0.1:8000/predict
    """
    _need_serve_extra()
    import uvicorn

    from clipzoo.serve.app import create_app
    from clipzoo.serve.inputs import Limits

    app = create_app(zoo_dir, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     limits=Limits(max_images=max_images, max_bytes=max_bytes))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@click.command("bench-serve")
@click.option("--out", default="bench-serve.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the JSON (machine, settings, figures).")
@click.option("--clients", default="1,8,32", show_default=True, help="Concurrent client counts to measure.")
@click.option("--requests", "n_requests", default=256, show_default=True, type=int, callback=at_least_one,
              help="Requests per row (several per client, so a row measures the steady state, not the ramp).")
@click.option("--images-per-request", "per_request", default=1, show_default=True, type=int, callback=at_least_one,
              help="Images in each request (more than one: multipart).")
@click.option("--experts", default="1,8,64", show_default=True,
              help="Zoo sizes for the experts sweep, one two-class built-in task an expert (at most 80; 'none': skip).")
@click.option("--in-encoder", default="1,4,8", show_default=True,
              help="Zoo sizes of in-encoder experts, one two-class task each, routed in one batch ('none': skip).")
@click.option("--in-encoder-kind", default="vit-adapter", show_default=True,
              help="Their kind (an expert that works inside the image encoder: vit-adapter, lora, vl-adapter).")
@click.option("--per-class", default=32, show_default=True, type=int, callback=at_least_one,
              help="Train and test images per class of the built-in tasks.")
@click.option("--reload/--no-reload", default=True, show_default=True, help="Measure a hot reload under load.")
@click.option("--backbone", default=None, help="Another open_clip architecture, e.g. ViT-B-32 (random weights, "
              "saved to a local safetensors file; no download).")
@json_option
def bench_serve(out: str, clients: str, n_requests: int, per_request: int, experts: str, in_encoder: str,
                in_encoder_kind: str, per_class: int, reload: bool, backbone: str | None, as_json: bool) -> None:
    """Measure the server on loopback: throughput against the bare backbone, latency, in-encoder
    experts sharing a batch, a hot reload under load, 1/8/64 experts, and time to first answer
    against open_clip's own model load.

    \b
    Example: clipzoo bench-serve --out bench-serve.json
             clipzoo bench-serve --backbone ViT-B-32 --clients 8,32 --images-per-request 2 --per-class 3 \\
                 --experts none --in-encoder 1,8 --no-reload
    """
    _need_serve_extra()
    from clipzoo.serve.bench import run_bench, summary

    def ints(s: str, what: str, allow_none: bool = False) -> list[int]:
        if allow_none and s.strip().lower() in ("none", "0", ""):
            return []
        try:
            vals = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            vals = []
        if not vals or min(vals) < 1:
            raise ConfigError(f"bad {what} {s!r}: give comma-separated positive integers, e.g. 1,8,32"
                              + (" (or 'none')" if allow_none else ""))
        return vals

    res = run_bench(out, ints(clients, "--clients"), n_requests, ints(experts, "--experts", True), backbone,
                    ints(in_encoder, "--in-encoder", True), in_encoder_kind, per_request, per_class, reload)
    emit(res, as_json, summary(res))
