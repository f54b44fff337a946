"""``clipzoo bench-serve``: the server measured on loopback, as ratios in one run.

- throughput under N concurrent clients against the bare backbone on the same images, batched
  like the server (decode + preprocess + forward, and the forward alone);
- p50 / p99 latency per N;
- in-encoder experts (``--in-encoder-kind``, vit-adapter by default): zoos of 1, 4, 8 such experts
  (copies of one trained expert, the router rebuilt over them, so one batch is routed to several
  of them), served under the largest client count; the server's cost against the backbone's, and
  the same in process (``predict_batch`` against ``encode_images`` on the same batches), with the
  distinct experts routed per batch. Each in-encoder expert runs the image tower again on its own
  rows, so the model cost is about one backbone pass plus one tower pass over the batch, plus
  per-group overhead that grows with the number of groups;
- a hot reload under load: clients keep posting while another process (``clipzoo add-task``)
  adds a task; failed requests are counted and the versions seen reported;
- throughput with 1, 8 and 64 experts (synthetic: copies of one trained expert under new names,
  then the router rebuilt over all of them, so a batch spreads over many experts);
- time to the first answer of a fresh ``clipzoo serve`` process against a fresh process that
  loads the model with open_clip itself (``open_clip.create_model`` with the weights file) and
  encodes one image.

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
                until: Any = None, per_request: int = 1) -> dict:
    """``clients`` concurrent clients posting ``per_request`` images per request (raw PNG for one,
    multipart for more), ``n_requests`` in all (or, with ``until``, until ``until()`` is true, at
    most ``n_requests``)."""
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    versions: list[int] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        async def client() -> None:
            for i in counter:
                if until is not None and until():
                    return
                mine = [images[(i * per_request + k) % len(images)] for k in range(per_request)]
                body = ({"content": mine[0], "headers": {"content-type": "image/png"}} if per_request == 1 else
                        {"files": [("file", (f"{k}.png", b, "image/png")) for k, b in enumerate(mine)]})
                t = time.perf_counter()
                try:
                    r = await c.post("/predict", **body)
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
            "images_per_s": round(len(lat) * per_request / wall, 2), "p50_ms": round(1000 * lat[len(lat) // 2], 2),
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


def _open_clip_load_s(spec: Any, probe: bytes) -> float:
    """A fresh process that loads the model with open_clip itself (``create_model`` with the
    weights file, the tiny model's config registered first) and encodes one image."""
    from clipzoo.zoo.backbone import ASSETS, TINY_MODEL, resolve

    name, weights = resolve(spec)
    cfg = str(ASSETS / f"{TINY_MODEL}.json") if name == TINY_MODEL else None
    code = ("import io,sys,torch,open_clip; from PIL import Image; cfg, name, w = sys.argv[1:4];"
            "cfg and open_clip.add_model_config(cfg);"
            "m = open_clip.create_model(name, pretrained=w).eval();"
            "pre = open_clip.image_transform(m.visual.image_size, is_train=False);"
            "torch.no_grad().__enter__();"
            "m.encode_image(pre(Image.open(io.BytesIO(sys.stdin.buffer.read())).convert('RGB'))[None])")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, cfg or "", name, weights or ""], input=probe, check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def _in_encoder(zoo_src: Path, tmp: Path, images: list[bytes], counts: list[int], clients: int,
                n_requests: int, per_request: int, base: float) -> list[dict]:
    """One row per count of in-encoder experts (copies of the one expert of ``zoo_src``): the
    server's throughput and its cost against ``base`` (the backbone's img/s), and in process
    ``predict_batch`` against ``encode_images`` on the same batches (per batch the best of five), with the
    distinct experts routed per batch and the share of inputs that fell back to zero-shot."""
    from PIL import Image

    from clipzoo.serve.batcher import Options, predict_batch
    from clipzoo.zoo.zoo import Zoo

    rows = []
    for n in counts:
        path = _clone_zoo(zoo_src, tmp / f"zoo-enc-{n}", n)
        z = Zoo.open(path)
        bb = z.backbone
        batches = [torch.stack([bb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[s:s + MAX_BATCH]])
                   for s in range(0, len(images), MAX_BATCH)]
        distinct, fell = [], 0
        for px in batches:
            r = z.route(bb.encode_images(px), 1)
            fell += int(r.fallback.sum())
            distinct.append(len({int(i) for i, f in zip(r.indices[:, 0], r.fallback) if not f}))
        t_fwd, t_all = 0.0, 0.0
        for px in batches:  # per batch, the best of five of each, interleaved (the machine is shared)
            f, a = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                bb.encode_images(px)
                t1 = time.perf_counter()
                predict_batch(z, [(px, Options())])
                f.append(t1 - t0)
                a.append(time.perf_counter() - t1)
            t_fwd, t_all = t_fwd + min(f), t_all + min(a)
        with Server(path, images[0]) as srv:
            asyncio.run(_load(srv.url, images, 4, 16))
            row = asyncio.run(_load(srv.url, images, clients, n_requests, per_request=per_request))
        rows.append({"experts": n, "kind": z.expert(z.names[0]).kind, "distinct_per_batch": round(statistics.mean(distinct), 2),
                     "fallback_share": round(fell / len(images), 3), "clients": clients,
                     **{k: row[k] for k in ("images_per_s", "p50_ms", "p99_ms", "failed")},
                     "ratio_to_backbone": round(row["images_per_s"] / base, 3),
                     "server_cost_x_backbone": round(base / row["images_per_s"], 3),
                     "in_process_cost_x_forward": round(t_all / t_fwd, 3)})
    return rows


def _add_task_proc(zoo: Path) -> subprocess.Popen:
    return subprocess.Popen([*_cli(), "add-task", "--zoo", str(zoo), "--name", "digits", "--data", "builtin:digits"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_bench(out: str | Path, clients: list[int], n_requests: int = 64, experts: list[int] = (1, 8, 64),
              backbone: str | None = None, in_encoder: list[int] = (1, 4, 8), in_encoder_kind: str = "vit-adapter",
              per_request: int = 1, per_class: int = 32, reload: bool = True) -> dict:
    """Run every measurement, write the JSON to ``out`` and return it. An empty ``experts`` or
    ``in_encoder`` list, or ``reload=False``, skips that part."""
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
        tasks = {d: load_builtin(d, n_train=per_class, n_test=per_class) for d in ("shapes", "colours")}
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
            "clipzoo_version": __version__, "backbone": {"model": spec.model, "pretrained": "random weights, local "
                                                         "safetensors file" if backbone else spec.pretrained},
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            "settings": {"max_batch": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS, "requests": n_requests,
                         "images_per_request": per_request, "clients": clients, "experts": list(experts),
                         "in_encoder": list(in_encoder), "in_encoder_kind": in_encoder_kind, "reload": reload,
                         "images": len(images)},
            "backbone_batched": _backbone_rate(zoo, images)}
        base = res["backbone_batched"]["decode_preprocess_forward_images_per_s"]
        res["open_clip_load_s"] = round(statistics.median(_open_clip_load_s(spec, images[0]) for _ in range(2)), 3)
        with Server(tmp / "zoo", images[0]) as srv:
            res["first_answer_s"] = round(srv.first_answer_s, 3)
            asyncio.run(_load(srv.url, images, 4, 16))  # warm-up
            res["throughput"] = [asyncio.run(_load(srv.url, images, n, n_requests, per_request=per_request))
                                 for n in clients]
            if reload:
                res["hot_reload"] = _reload_under_load(srv.url, tmp / "zoo", images)
        again = _backbone_rate(zoo, images)  # measured again after the load: the better of the two is the base
        if again["decode_preprocess_forward_images_per_s"] > base:
            res["backbone_batched"], base = again, again["decode_preprocess_forward_images_per_s"]
        for row in res["throughput"]:
            row["ratio_to_backbone"] = round(row["images_per_s"] / base, 3)
        res["first_answer_ratio"] = round(res["first_answer_s"] / res["open_clip_load_s"], 3)
        n_clients = max(clients)
        if in_encoder:
            enc = Zoo.create(tmp / "zoo-enc", spec)
            enc.add_task(tasks["shapes"], kind=in_encoder_kind, train=TrainSettings(epochs=2))
            own = [png(im) for im in tasks["shapes"].test.images]  # its own task's images: routed, none fall back
            res["in_encoder"] = _in_encoder(tmp / "zoo-enc", tmp, own, list(in_encoder), n_clients, n_requests,
                                            per_request, _backbone_rate(enc, own)["decode_preprocess_forward_images_per_s"])
        res["experts"] = []
        for e in experts:
            z = _clone_zoo(one, tmp / f"zoo-{e}", e) if e > 1 else one
            with Server(z, images[0]) as srv:
                asyncio.run(_load(srv.url, images, 4, 16))
                row = asyncio.run(_load(srv.url, images, n_clients, n_requests, per_request=per_request))
            res["experts"].append({"experts": e, **{k: row[k] for k in ("images_per_s", "p50_ms", "p99_ms", "failed")}})
        for row in res["experts"]:
            row["ratio_to_first"] = round(row["images_per_s"] / res["experts"][0]["images_per_s"], 3)
    finally:
        if old_cache is None:
            os.environ.pop("CLIPZOO_CACHE", None)
        shutil.rmtree(tmp, ignore_errors=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def _reload_under_load(url: str, zoo: Path, images: list[bytes]) -> dict:
    """8 clients posting while ``clipzoo add-task`` adds a task in another process, and 2 s after."""
    proc = _add_task_proc(zoo)
    done_at: list[float] = []

    def until() -> bool:
        if proc.poll() is None:
            return False
        done_at.append(time.perf_counter())
        return time.perf_counter() - done_at[0] > 2.0  # keep going 2 s after the commit
    row = asyncio.run(_load(url, images, 8, 100_000, until))
    if proc.wait() != 0:
        raise RuntimeError(f"add-task failed during the reload run: {proc.stderr.read().decode()[-300:]}")
    return {k: row[k] for k in ("clients", "requests", "failed", "versions", "p50_ms", "p99_ms")}


def _random_weights(model: str, tmp: Path) -> str:
    """An open_clip architecture with random weights saved to a local safetensors file (no download)."""
    import open_clip
    from safetensors.torch import save_file

    m = open_clip.create_model(model, pretrained=None)
    path = tmp / f"{model}-random.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def summary(res: dict) -> str:
    """The figures as Markdown tables for a person (and the README)."""
    bb, st = res["backbone_batched"], res["settings"]
    lines = [f"backbone {res['backbone']['model']}; {res['machine']['cpus']} CPUs, load "
             f"{res['machine']['load_avg_1m_at_start']} at start; max batch {st['max_batch']}, max wait "
             f"{st['max_wait_ms']} ms, {st['requests']} requests of {st['images_per_request']} image(s) per row",
             f"backbone batched: {bb['decode_preprocess_forward_images_per_s']} img/s with decode+preprocess, "
             f"{bb['forward_images_per_s']} img/s forward only",
             "", "| clients | img/s | x backbone | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['images_per_s']} | {r['ratio_to_backbone']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['failed']} |" for r in res["throughput"]]
    if "hot_reload" in res:
        h = res["hot_reload"]
        lines += ["", f"hot reload under load: {h['requests']} requests from {h['clients']} clients, {h['failed']} "
                      f"failed, versions seen {h['versions']}, p99 {h['p99_ms']} ms"]
    if res.get("in_encoder"):
        lines += ["", "| in-encoder experts | kind | distinct per batch | clients | img/s | server cost x backbone "
                      "| in-process cost x forward | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['experts']} | {r['kind']} | {r['distinct_per_batch']} | {r['clients']} | {r['images_per_s']} | "
                  f"{r['server_cost_x_backbone']} | {r['in_process_cost_x_forward']} | {r['p50_ms']} | {r['p99_ms']} | "
                  f"{r['failed']} |" for r in res["in_encoder"]]
    if res["experts"]:
        lines += ["", "| experts | img/s | x 1 expert | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['experts']} | {r['images_per_s']} | {r['ratio_to_first']} | {r['p50_ms']} | {r['p99_ms']} |"
                  for r in res["experts"]]
    lines += ["", f"first answer {res['first_answer_s']} s after start; open_clip create_model + weights file + "
                  f"one image {res['open_clip_load_s']} s (ratio {res['first_answer_ratio']})"]
    return "\n".join(lines)
