"""``clipzoo bench-serve``: the server measured on loopback, as ratios in one run.

- throughput under N concurrent clients (one image per request) against the bare backbone on the
  same images, batched like the server (decode + preprocess + forward, and the forward alone);
- p50 / p99 latency per N;
- a hot reload under load: clients keep posting while another process (``clipzoo add-task``)
  adds a task; failed requests are counted and the versions seen reported;
- throughput with 1, 8 and 64 experts (synthetic: copies of one trained expert under new names,
  then the router rebuilt over all of them, so a batch spreads over many experts);
- time to the first answer of a fresh ``clipzoo serve`` process against a fresh process that
  only loads the backbone and encodes one image.

The server runs as its own process (``clipzoo serve``), the clients as asyncio tasks here.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipzoo import __version__

MAX_BATCH, MAX_WAIT_MS = 32, 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("clipzoo")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from clipzoo.cli import main; main()"]


class Server:
    """A ``clipzoo serve`` subprocess on a free loopback port; ``first_answer_s`` is measured
    from the spawn to the first successful ``/predict``."""

    def __init__(self, zoo: Path, probe: bytes, timeout: float = 300):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*_cli(), "serve", "--zoo", str(zoo), "--port", str(self.port),
                                      "--max-batch", str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clipzoo serve exited: {self.proc.stderr.read().decode()[-500:]}")
            if time.perf_counter() - t0 > timeout:
                self.close()
                raise RuntimeError("clipzoo serve did not answer in time")
            try:
                r = httpx.post(f"{self.url}/predict", content=probe, headers={"content-type": "image/png"}, timeout=30)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.02)
        self.first_answer_s = time.perf_counter() - t0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _load(url: str, images: list[bytes], clients: int, n_requests: int,
                until: Any = None) -> dict:
    """``clients`` concurrent clients posting one image per request, ``n_requests`` in all (or,
    with ``until``, until ``until()`` is true, at most ``n_requests``)."""
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    versions: list[int] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        async def client() -> None:
            for i in counter:
                if until is not None and until():
                    return
                t = time.perf_counter()
                try:
                    r = await c.post("/predict", content=images[i % len(images)], headers={"content-type": "image/png"})
                    code = r.status_code
                    if code == 200:
                        versions.append(r.json()["zoo_version"])
                except httpx.HTTPError:
                    code = -1
                lat.append(time.perf_counter() - t)
                codes[code] = codes.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": len(lat), "failed": sum(n for k, n in codes.items() if k != 200),
            "images_per_s": round(len(lat) / wall, 2), "p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "versions": sorted(set(versions))}


def _backbone_rate(zoo: Any, images: list[bytes], repeats: int = 3) -> dict:
    """Images per second of the bare backbone in batches of :data:`MAX_BATCH`: decode + preprocess +
    forward, and the forward alone (best of ``repeats``)."""
    from PIL import Image

    bb = zoo.backbone
    full, fwd = [], []
    for _ in range(repeats):
        t0, t_fwd = time.perf_counter(), 0.0
        for s in range(0, len(images), MAX_BATCH):
            px = torch.stack([bb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[s:s + MAX_BATCH]])
            t1 = time.perf_counter()
            bb.encode_images(px)
            t_fwd += time.perf_counter() - t1
        full.append(len(images) / (time.perf_counter() - t0))
        fwd.append(len(images) / t_fwd)
    return {"decode_preprocess_forward_images_per_s": round(max(full), 2), "forward_images_per_s": round(max(fwd), 2)}


def _clone_zoo(src: Path, dst: Path, n: int) -> Path:
    """A synthetic zoo of ``n`` experts: the first expert of ``src`` copied under ``n`` names, the
    router then rebuilt over all of them (through the public ``refresh_router``)."""
    from clipzoo.zoo import registry
    from clipzoo.zoo.zoo import Zoo

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".readers", ".trash", ".staging-*"))
    reg = registry.read(dst)
    name, rec = next(iter(reg["experts"].items()))
    for i in range(1, n):
        new = f"{name}-{i}"
        shutil.copytree(dst / registry.EXPERTS_DIR / name, dst / registry.EXPERTS_DIR / new)
        reg["experts"][new] = {**copy.deepcopy(rec), "name": new}
    registry.write(dst, reg)
    Zoo.open(dst).refresh_router()
    return dst


def _backbone_load_s(spec: dict, probe: bytes) -> float:
    """A fresh process that loads the backbone (as open_clip builds it) and encodes one image."""
    code = ("import io,sys,torch; from PIL import Image; from clipzoo.zoo.backbone import BackboneSpec, load_backbone;"
            f"bb=load_backbone(BackboneSpec.from_dict({spec!r})); m=bb.model;"
            "bb.encode_images(bb.preprocess(Image.open(io.BytesIO(sys.stdin.buffer.read())).convert('RGB'))[None])")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], input=probe, check=True, capture_output=True)
    return time.perf_counter() - t0


def _add_task_proc(zoo: Path) -> subprocess.Popen:
    return subprocess.Popen([*_cli(), "add-task", "--zoo", str(zoo), "--name", "digits", "--data", "builtin:digits"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_bench(out: str | Path, clients: list[int], n_requests: int = 64, experts: list[int] = (1, 8, 64),
              backbone: str | None = None) -> dict:
    """Run every measurement, write the JSON to ``out`` and return it."""
    from clipzoo.tasks.data import load_builtin
    from clipzoo.zoo.backbone import BackboneSpec
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    tmp = Path(tempfile.mkdtemp(prefix="clipzoo-bench-serve-"))
    old_cache = os.environ.get("CLIPZOO_CACHE")
    os.environ.setdefault("CLIPZOO_CACHE", str(tmp / "cache"))
    try:
        spec = BackboneSpec(model=backbone, pretrained=_random_weights(backbone, tmp)) if backbone else BackboneSpec()
        zoo = Zoo.create(tmp / "zoo", spec)
        tasks = {d: load_builtin(d, n_train=32, n_test=32) for d in ("shapes", "colours")}
        for t in tasks.values():
            zoo.add_task(t, train=TrainSettings(epochs=5))
        one = _clone_zoo(tmp / "zoo", tmp / "zoo-one", 1)
        Zoo.open(one).remove("colours")

        def png(im: Any) -> bytes:
            buf = io.BytesIO()
            im.save(buf, "PNG")
            return buf.getvalue()

        images = [png(im) for t in tasks.values() for im in t.test.images]
        res: dict[str, Any] = {
            "clipzoo_version": __version__, "backbone": spec.to_dict(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            "settings": {"max_batch": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS, "requests": n_requests,
                         "images_per_request": 1, "clients": clients, "experts": list(experts), "images": len(images)},
            "backbone_batched": _backbone_rate(zoo, images)}
        base = res["backbone_batched"]["decode_preprocess_forward_images_per_s"]
        res["backbone_load_s"] = round(statistics.median(_backbone_load_s(spec.to_dict(), images[0]) for _ in range(2)), 3)
        with Server(tmp / "zoo", images[0]) as srv:
            res["first_answer_s"] = round(srv.first_answer_s, 3)
            asyncio.run(_load(srv.url, images, 4, 16))  # warm-up
            res["throughput"] = []
            for n in clients:
                row = asyncio.run(_load(srv.url, images, n, n_requests))
                row["ratio_to_backbone"] = round(row["images_per_s"] / base, 3)
                res["throughput"].append(row)
            proc = _add_task_proc(tmp / "zoo")
            done_at: list[float] = []

            def until() -> bool:
                if proc.poll() is None:
                    return False
                done_at.append(time.perf_counter())
                return time.perf_counter() - done_at[0] > 2.0  # keep going 2 s after the commit
            reload_row = asyncio.run(_load(srv.url, images, 8, 100_000, until))
            if proc.wait() != 0:
                raise RuntimeError(f"add-task failed during the reload run: {proc.stderr.read().decode()[-300:]}")
            res["hot_reload"] = {k: reload_row[k] for k in ("clients", "requests", "failed", "versions", "p50_ms",
                                                            "p99_ms")}
        again = _backbone_rate(zoo, images)  # measured again after the load: the better of the two is the base
        if again["decode_preprocess_forward_images_per_s"] > base:
            res["backbone_batched"], base = again, again["decode_preprocess_forward_images_per_s"]
            for row in res["throughput"]:
                row["ratio_to_backbone"] = round(row["images_per_s"] / base, 3)
        res["first_answer_ratio"] = round(res["first_answer_s"] / res["backbone_load_s"], 3)
        res["experts"] = []
        n_clients = max(clients)
        for e in experts:
            z = _clone_zoo(one, tmp / f"zoo-{e}", e) if e > 1 else one
            with Server(z, images[0]) as srv:
                asyncio.run(_load(srv.url, images, 4, 16))
                row = asyncio.run(_load(srv.url, images, n_clients, n_requests))
            res["experts"].append({"experts": e, **{k: row[k] for k in ("images_per_s", "p50_ms", "p99_ms", "failed")}})
        first = res["experts"][0]["images_per_s"]
        for row in res["experts"]:
            row["ratio_to_first"] = round(row["images_per_s"] / first, 3)
    finally:
        if old_cache is None:
            os.environ.pop("CLIPZOO_CACHE", None)
        shutil.rmtree(tmp, ignore_errors=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def _random_weights(model: str, tmp: Path) -> str:
    """An open_clip architecture with random weights saved to a local safetensors file (no download)."""
    import open_clip
    from safetensors.torch import save_file

    m = open_clip.create_model(model, pretrained=None)
    path = tmp / f"{model}-random.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def summary(res: dict) -> str:
    """The figures as a Markdown table for a person (and the README)."""
    bb = res["backbone_batched"]
    lines = [f"backbone batched: {bb['decode_preprocess_forward_images_per_s']} img/s with decode+preprocess, "
             f"{bb['forward_images_per_s']} img/s forward only",
             "", "| clients | img/s | x backbone | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['images_per_s']} | {r['ratio_to_backbone']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['failed']} |" for r in res["throughput"]]
    h = res["hot_reload"]
    lines += ["", f"hot reload under load: {h['requests']} requests from {h['clients']} clients, {h['failed']} failed, "
                  f"versions seen {h['versions']}, p99 {h['p99_ms']} ms",
              "", "| experts | img/s | x 1 expert | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['images_per_s']} | {r['ratio_to_first']} | {r['p50_ms']} | {r['p99_ms']} |"
              for r in res["experts"]]
    lines += ["", f"first answer {res['first_answer_s']} s after start; backbone load + one image "
                  f"{res['backbone_load_s']} s (ratio {res['first_answer_ratio']})"]
    return "\n".join(lines)
