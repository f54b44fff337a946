"""``clipzoo bench-serve``: the server measured on loopback, as ratios in one run.

- throughput under N concurrent clients against the bare backbone on the same images, batched
  like the server (decode + preprocess + forward, and the forward alone);
- p50 / p99 latency per N;
- in-encoder experts (``--in-encoder-kind``, vit-adapter by default): zoos of 1, 4, 8 such experts,
  each trained on its own two-class task cut from the built-in domains (so a mixed batch is routed
  to several of them), served with those tasks' test images under the largest client count; the
  server's cost against the backbone's, and the same in process (``predict_batch`` against
  ``encode_images`` on the same batches), with the distinct experts routed per batch. The rows of
  every routed in-encoder expert share one pass of the image tower, each row with its own
  expert's hooks (:class:`clipzoo.zoo.encoders.RowHooks`), so the model cost is about one backbone
  pass plus one tower pass over the batch, plus small per-expert adapter work at each hooked site;
- a hot reload under load: clients keep posting while another process (``clipzoo add-task``)
  adds a task; failed requests are counted and the versions seen reported;
- throughput with 1, 8 and 64 clip-adapter experts, grown the same way (64 distinct two-class
  tasks), each zoo served with its tasks' test images, with the same in-process figures;
- time to the first answer of a fresh ``clipzoo serve`` process against a fresh process that
  loads the model with open_clip itself (``open_clip.create_model`` with the weights file) and
  encodes one image.

The server runs as its own process (``clipzoo serve``), the clients as asyncio tasks here.
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Callable

import torch

from clipzoo import __version__
from clipzoo.errors import ConfigError
from clipzoo.tasks.sequence import class_pair_tasks
from clipzoo.tasks.synthetic import DOMAINS

MAX_BATCH, MAX_WAIT_MS = 32, 10.0
GROW_DOMAINS = ("shapes", "colours", "textures", "digits")  # their class pairs: the distinct tasks of the grown zoos


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
    """Images per second of the bare backbone in full batches of :data:`MAX_BATCH` (the images
    taken in turn, as the server's clients send them), sustained over ``repeats`` passes of at
    least ``len(images)`` images (all their images over all their time, as a server row is
    measured): decode + preprocess + forward, and the forward alone."""
    from PIL import Image

    bb = zoo.backbone
    per_pass = -(-len(images) // MAX_BATCH) * MAX_BATCH
    stream = [images[i % len(images)] for i in range(per_pass)]
    t0, t_fwd = time.perf_counter(), 0.0
    for _ in range(repeats):
        for s in range(0, per_pass, MAX_BATCH):
            px = torch.stack([bb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in stream[s:s + MAX_BATCH]])
            t1 = time.perf_counter()
            bb.encode_images(px)
            t_fwd += time.perf_counter() - t1
    n = per_pass * repeats
    return {"decode_preprocess_forward_images_per_s": round(n / (time.perf_counter() - t0), 2),
            "forward_images_per_s": round(n / t_fwd, 2)}


def _against_backbone(zoo: Any, images: list[bytes], row: Callable[[], dict]) -> dict:
    """``row()`` (a server measurement with ``images_per_s``) with the bare backbone measured right
    before and right after it: the base is their mean, so a machine whose speed drifts weighs on
    both sides alike."""
    before = _backbone_rate(zoo, images)["decode_preprocess_forward_images_per_s"]
    out = row()
    after = _backbone_rate(zoo, images)["decode_preprocess_forward_images_per_s"]
    base = (before + after) / 2
    return {**out, "base_images_per_s": round(base, 2), "base_before_after": [before, after],
            "ratio_to_backbone": round(out["images_per_s"] / base, 3),
            "server_cost_x_backbone": round(base / out["images_per_s"], 3)}


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


def _grow(tasks: list[Any], spec: Any, kind: str, counts: list[int], tmp: Path, label: str):
    """Add the tasks one by one as experts of ``kind`` to a new zoo and yield ``(n, copy of the zoo
    with n experts)`` for each ``n`` in ``counts``."""
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    z = Zoo.create(tmp / f"zoo-{label}", spec)
    for i, t in enumerate(tasks[:max(counts)], 1):
        z.add_task(t, kind=kind, train=TrainSettings(epochs=2))
        if i in counts:
            path = tmp / f"zoo-{label}-{i}"
            shutil.copytree(z.root, path, ignore=shutil.ignore_patterns(".readers", ".trash", ".staging-*"))
            yield i, path


def _measure_zoo(path: Path, images: list[bytes], clients: int, n_requests: int, per_request: int) -> dict:
    """One zoo on ``images``: the distinct experts routed per batch, the share that fell back to
    zero-shot, in process ``predict_batch`` against ``encode_images`` on the same batches (per
    batch the best of five, interleaved), the backbone's img/s, and the server's figures."""
    from PIL import Image

    from clipzoo.serve.batcher import Options, predict_batch
    from clipzoo.zoo.zoo import Zoo

    z = Zoo.open(path)
    bb = z.backbone
    batches = [torch.stack([bb.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[s:s + MAX_BATCH]])
               for s in range(0, len(images), MAX_BATCH)]
    distinct, fell, t_fwd, t_all = [], 0, 0.0, 0.0
    for px in batches:
        r = z.route(bb.encode_images(px), 1)
        fell += int(r.fallback.sum())
        distinct.append(len({int(k) for k, f in zip(r.indices[:, 0], r.fallback) if not f}))
        f, a = [], []
        for _ in range(5):  # the machine is shared: the best of five of each, interleaved
            t0 = time.perf_counter()
            bb.encode_images(px)
            t1 = time.perf_counter()
            predict_batch(z, [(px, Options())])
            f.append(t1 - t0)
            a.append(time.perf_counter() - t1)
        t_fwd, t_all = t_fwd + min(f), t_all + min(a)
    with Server(path, images[0]) as srv:
        asyncio.run(_load(srv.url, images, 4, 16))
        row = _against_backbone(z, images, lambda: asyncio.run(
            _load(srv.url, images, clients, n_requests, per_request=per_request)))
    return {"kind": z.expert(z.names[0]).kind, "distinct_per_batch": round(statistics.mean(distinct), 2),
            "fallback_share": round(fell / len(images), 3), "clients": clients,
            **{k: row[k] for k in ("images_per_s", "p50_ms", "p99_ms", "failed", "base_images_per_s",
                                   "ratio_to_backbone", "server_cost_x_backbone")},
            "in_process_cost_x_forward": round(t_all / t_fwd, 3)}


def _pngs(tasks: list[Any]) -> list[bytes]:
    """PNG bytes of the tasks' test images, each image once (class-pair tasks share images)."""
    seen, out = set(), []
    for t in tasks:
        for im in t.test.images:
            if id(im) not in seen:
                seen.add(id(im))
                buf = io.BytesIO()
                im.save(buf, "PNG")
                out.append(buf.getvalue())
    return out


def _shuffled(images: list[bytes]) -> list[bytes]:
    return [images[k] for k in torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def _add_task_proc(zoo: Path) -> subprocess.Popen:
    return subprocess.Popen([*_cli(), "add-task", "--zoo", str(zoo), "--name", "digits", "--data", "builtin:digits"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_bench(out: str | Path, clients: list[int], n_requests: int = 256, experts: list[int] = (1, 8, 64),
              backbone: str | None = None, in_encoder: list[int] = (1, 4, 8), in_encoder_kind: str = "vit-adapter",
              per_request: int = 1, per_class: int = 32, reload: bool = True) -> dict:
    """Run every measurement, write the JSON to ``out`` and return it. An empty ``experts`` or
    ``in_encoder`` list, or ``reload=False``, skips that part."""
    from clipzoo.tasks.data import load_builtin
    from clipzoo.zoo.backbone import BackboneSpec
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    pairs = sum(len(c) * (len(c) - 1) // 2 for d, c in DOMAINS.items() if d in GROW_DOMAINS)
    if max([*in_encoder, *experts, 0]) > pairs:
        raise ConfigError(f"--in-encoder / --experts ask for {max([*in_encoder, *experts])} experts; the built-in "
                          f"domains' class pairs give {pairs}: use at most {pairs}")
    tmp = Path(tempfile.mkdtemp(prefix="clipzoo-bench-serve-"))
    old_cache = os.environ.get("CLIPZOO_CACHE")
    os.environ.setdefault("CLIPZOO_CACHE", str(tmp / "cache"))
    try:
        spec = BackboneSpec(model=backbone, pretrained=_random_weights(backbone, tmp)) if backbone else BackboneSpec()
        zoo = Zoo.create(tmp / "zoo", spec)
        tasks = {d: load_builtin(d, n_train=per_class, n_test=per_class) for d in GROW_DOMAINS}
        for d in ("shapes", "colours"):
            zoo.add_task(tasks[d], train=TrainSettings(epochs=5))
        images = _pngs([tasks["shapes"], tasks["colours"]])
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
        res["open_clip_load_s"] = round(statistics.median(_open_clip_load_s(spec, images[0]) for _ in range(2)), 3)
        with Server(tmp / "zoo", images[0]) as srv:
            res["first_answer_s"] = round(srv.first_answer_s, 3)
            asyncio.run(_load(srv.url, images, 4, 16))  # warm-up
            res["throughput"] = [_against_backbone(zoo, images, lambda n=n: asyncio.run(
                _load(srv.url, images, n, n_requests, per_request=per_request))) for n in clients]
            if reload:
                res["hot_reload"] = _reload_under_load(srv.url, tmp / "zoo", images)
        res["first_answer_ratio"] = round(res["first_answer_s"] / res["open_clip_load_s"], 3)
        n_clients = max(clients)
        res["in_encoder"], res["experts"] = [], []
        for key, kind, counts in (("in_encoder", in_encoder_kind, in_encoder), ("experts", "clip-adapter", experts)):
            if not counts:
                continue
            parts = class_pair_tasks(list(tasks.values()), max(counts))
            for n, path in _grow(parts, spec, kind, sorted(set(counts)), tmp, key):
                res[key].append({"experts": n, **_measure_zoo(path, _shuffled(_pngs(parts[:n])), n_clients,
                                                              n_requests, per_request)})
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
             f"backbone batched (first measure): {bb['decode_preprocess_forward_images_per_s']} img/s with "
             f"decode+preprocess, {bb['forward_images_per_s']} img/s forward only; each row's base is the mean of "
             "the backbone measured right before and right after it",
             "", "| clients | img/s | base img/s | x backbone | p50 ms | p99 ms | failed |", "|---" * 7 + "|"]
    lines += [f"| {r['clients']} | {r['images_per_s']} | {r['base_images_per_s']} | {r['ratio_to_backbone']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['failed']} |" for r in res["throughput"]]
    if "hot_reload" in res:
        h = res["hot_reload"]
        lines += ["", f"hot reload under load: {h['requests']} requests from {h['clients']} clients, {h['failed']} "
                      f"failed, versions seen {h['versions']}, p99 {h['p99_ms']} ms"]
    for key, title in (("in_encoder", "in-encoder experts"), ("experts", "experts in the zoo")):
        if res.get(key):
            lines += ["", f"| {title} | kind | distinct per batch | fallback share | clients | img/s | base img/s "
                          "| server cost x backbone | in-process cost x forward | p50 ms | p99 ms | failed |", "|---" * 12 + "|"]
            lines += [f"| {r['experts']} | {r['kind']} | {r['distinct_per_batch']} | {r['fallback_share']} | {r['clients']} | "
                      f"{r['images_per_s']} | {r['base_images_per_s']} | {r['server_cost_x_backbone']} | "
                      f"{r['in_process_cost_x_forward']} | "
                      f"{r['p50_ms']} | {r['p99_ms']} | {r['failed']} |" for r in res[key]]
    if res.get("experts"):
        lines += ["", "throughput with " + ", ".join(f"{r['experts']} experts {r['ratio_to_first']}x"
                                                     for r in res["experts"]) + " that with the first"]
    lines += ["", f"first answer {res['first_answer_s']} s after start; open_clip create_model + weights file + "
                  f"one image {res['open_clip_load_s']} s (ratio {res['first_answer_ratio']})"]
    return "\n".join(lines)
