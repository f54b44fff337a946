"""``clipzoo bench-cost``: what the ceremony around the work costs, as ratios measured in one run.

- startup: wall time of ``clipzoo list`` / ``verify`` / ``router`` against ``clipzoo --help``
  (fresh subprocesses, interleaved, median of ``runs``), and which heavy modules each imported;
- feature-cache hits: per image, with 1k and with 50k entries in the cache (synthetic entries
  written directly into a cache folder under a temporary directory; the probe images are real
  files whose keys come from the key memo);
- predict of images whose features are all cached, in a fresh process: whether the backbone's
  model was built, and how long it took.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipzoo.runtime import threads

_WRAP = ("import atexit, sys\n"
         "atexit.register(lambda: sys.stderr.write('\\nHEAVY=' + ','.join(m for m in ('torch', 'open_clip', 'sklearn', "
         "'scipy') if m in sys.modules) + '\\n'))\n"
         "from clipzoo.cli import main\nmain(sys.argv[1:], prog_name='clipzoo')\n")


def _cli(args: list[str], env: dict) -> tuple[float, list[str]]:
    """Wall seconds of one ``clipzoo ARGS`` in a fresh interpreter, and the heavy modules it imported."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAP, *args], env=env, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"clipzoo {' '.join(args)} failed: {r.stderr.strip()[-400:]}")
    heavy = r.stderr.rsplit("HEAVY=", 1)[-1].strip()
    return dt, [m for m in heavy.split(",") if m]


def startup(zoo: Path, runs: int, env: dict) -> dict:
    """Median wall time of each light command and of ``--help`` (interleaved), and their ratios."""
    cmds = {"--help": ["--help"], "list": ["list", "--zoo", str(zoo)], "verify": ["verify", "--zoo", str(zoo)],
            "router": ["router", "--zoo", str(zoo)]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    heavy: dict[str, list[str]] = {}
    for _ in range(runs):
        for name, args in cmds.items():
            dt, heavy[name] = _cli(args, env)
            times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": {k: round(v, 4) for k, v in med.items()},
            "ratio_vs_help": {k: round(v / med["--help"], 2) for k, v in med.items() if k != "--help"},
            "heavy_modules_imported": heavy}


def cache_hits(root: Path, small: int, large: int, dim: int, probes: int, seed: int = 0) -> dict:
    """Per-image hit cost at ``small`` and at ``large`` cached entries (the same probe images)."""
    from PIL import Image

    from clipzoo.zoo.cache import FeatureCache, encode_cached

    gen = torch.Generator().manual_seed(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    files = []
    for i in range(probes):
        p = img_dir / f"{i}.png"
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(p)
        files.append(p)
    cache = FeatureCache(["bench-cost", str(dim)], root=root / "features")
    probe_keys = [cache.key(p) for p in files]
    cache.put(probe_keys, torch.randn(len(files), dim, generator=gen))  # also writes the key memo
    filled = len(files)

    def fill(total: int) -> None:
        nonlocal filled
        while filled < total:
            n = min(5000, total - filled)
            cache.put([f"synthetic-{filled + j}" for j in range(n)], torch.randn(n, dim, generator=gen))
            filled += n

    def fail(*_):
        raise AssertionError("a cached image was encoded")

    def measure() -> dict:
        for p in files[:8]:  # warm the OS page cache and the connection
            encode_cached([p], fail, fail, cache)
        t0 = time.perf_counter()
        for p in files:
            encode_cached([p], fail, fail, cache)
        single = (time.perf_counter() - t0) / len(files)
        t0 = time.perf_counter()
        encode_cached(files, fail, fail, cache)
        batch = (time.perf_counter() - t0) / len(files)
        return {"entries": len(cache), "single_image_call_ms": round(1000 * single, 4),
                "batch_call_ms_per_image": round(1000 * batch, 4)}

    fill(small)
    at_small = measure()
    fill(large)
    at_large = measure()
    shards = len(list((root / "features" / cache.ns).glob("*.safetensors")))
    return {"small": at_small, "large": at_large, "shards_at_large": shards,
            "ratio_single": round(at_large["single_image_call_ms"] / at_small["single_image_call_ms"], 2),
            "ratio_batch": round(at_large["batch_call_ms_per_image"] / at_small["batch_call_ms_per_image"], 2)}


_PREDICT = ("import json, sys, time\nt0 = time.perf_counter()\nfrom clipzoo.zoo.zoo import Zoo\n"
            "z = Zoo.open(sys.argv[1]); paths = sys.argv[3:]\n"
            "preds = z.predict(paths, fallback=sys.argv[2] == 'fallback')\n"
            "print(json.dumps({'seconds': round(time.perf_counter() - t0, 3), 'images': len(paths), "
            "'model_built': z.backbone.built, 'fallbacks': sum(bool(p.get('fallback')) for p in preds)}))\n")


def cached_predict(zoo: Path, images: list[Path], env: dict) -> dict:
    """Predict ``images`` once to fill the cache, then again in fresh processes: was the model built?"""
    out = {}
    for mode in ("no-fallback", "fallback"):
        for _ in range(2):  # the first run fills the cache (and the backbone memo) if needed
            r = subprocess.run([sys.executable, "-c", _PREDICT, str(zoo), mode, *map(str, images)], env=env,
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"predict failed: {r.stderr.strip()[-400:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def build_zoo(root: Path, env: dict) -> tuple[Path, list[Path]]:
    """A zoo with one clip-adapter expert on the embedded backbone, and a few test images."""
    zoo = root / "zoo"
    for args in (["init", "--zoo", str(zoo)],
                 ["add-task", "--zoo", str(zoo), "--name", "shapes", "--data", "builtin:shapes", "--epochs", "2"]):
        subprocess.run([sys.executable, "-c", _WRAP, *args], env=env, check=True, capture_output=True, timeout=900)
    from clipzoo.tasks.data import load_builtin

    images = []
    for i, im in enumerate(load_builtin("shapes", n_train=1, n_test=4).test.images):
        images.append(root / f"probe-{i}.png")
        im.save(images[-1])
    return zoo, images


def run_cost(runs: int = 5, small: int = 1000, large: int = 50_000, dim: int = 512, probes: int = 200,
             zoo: Path | None = None) -> dict:
    """Every measurement above in one run; returns the JSON document (machine, settings, results)."""
    with tempfile.TemporaryDirectory(prefix="clipzoo-cost-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "CLIPZOO_CACHE": str(tmp / "cache"), "CLIPZOO_DISABLE_PROGRESS_BARS": "1"}
        images: list[Path] = []
        if zoo is None:
            zoo, images = build_zoo(tmp, env)
        result = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                        "torch": torch.__version__, "threads": threads() or torch.get_num_threads(),
                        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
            "settings": {"runs": runs, "cache_small": small, "cache_large": large, "dim": dim, "probes": probes,
                         "zoo": "built: 1 clip-adapter expert (builtin:shapes) on clipzoo-tiny" if images else str(zoo)},
            "startup": startup(zoo, runs, env),
            "cache_hit": cache_hits(tmp / "hits", small, large, dim, probes),
        }
        if images:
            result["cached_predict"] = cached_predict(zoo, images, env)
    s, c = result["startup"]["ratio_vs_help"], result["cache_hit"]
    result["targets"] = {"list_within_3x_help": s["list"] <= 3, "verify_within_3x_help": s["verify"] <= 3,
                         "cache_hit_within_1.5x_1k_to_50k": c["ratio_single"] <= 1.5 and c["ratio_batch"] <= 1.5}
    if "cached_predict" in result:
        result["targets"]["cached_predict_without_model"] = not result["cached_predict"]["no-fallback"]["model_built"]
    return result


def markdown(res: dict) -> str:
    """The README's table."""
    s, c = res["startup"], res["cache_hit"]
    rows = [("`clipzoo list` vs `clipzoo --help`", f"{s['ratio_vs_help']['list']}x", "3x"),
            ("`clipzoo verify` vs `clipzoo --help`", f"{s['ratio_vs_help']['verify']}x", "3x"),
            ("`clipzoo router` (show) vs `clipzoo --help`", f"{s['ratio_vs_help']['router']}x", "-"),
            ("heavy modules imported by list / verify / router",
             " / ".join(",".join(s["heavy_modules_imported"][k]) or "none" for k in ("list", "verify", "router")), "none"),
            (f"cache hit per image, one-image calls, {c['large']['entries']:,} vs {c['small']['entries']:,} entries",
             f"{c['ratio_single']}x ({c['small']['single_image_call_ms']} -> {c['large']['single_image_call_ms']} ms)",
             "1.5x"),
            (f"cache hit per image, one {res['settings']['probes']}-image call, same sizes",
             f"{c['ratio_batch']}x ({c['small']['batch_call_ms_per_image']} -> {c['large']['batch_call_ms_per_image']} ms)",
             "1.5x")]
    if "cached_predict" in res:
        for mode, p in res["cached_predict"].items():
            rows.append((f"predict of {p['images']} cached images ({mode}), fresh process",
                         f"model built: {'yes' if p['model_built'] else 'no'}; {p['seconds']} s; fallbacks {p['fallbacks']}",
                         "not built"))
    lines = ["| what | measured | target |", "|---|---|---|"] + [f"| {a} | {b} | {t} |" for a, b, t in rows]
    return "\n".join(lines)
