"""``clipzoo bench-cost``: what the ceremony around the work costs, as ratios measured in one run.

- startup: wall time of ``clipzoo list`` / ``verify`` / ``router`` against ``clipzoo --help``
  (fresh subprocesses, interleaved, median of ``runs``), and which heavy modules each imported;
- feature-cache hits: per image, with 1k and with 50k entries in the cache (synthetic entries
  written directly into a cache folder under a temporary directory; the probe images are real
  files whose keys come from the key memo; two caches, measured in turn), one-image calls and one
  batch call, best of 3 passes;
- predict of images whose features are all cached, in a fresh process: whether the backbone's
  model was built, and how long it took;
- add-task with cached features (in process, embedded backbone): ``add_seconds`` and the router
  update's share of it for expert #2 and expert #N (the zoo filled with distinct two-class tasks
  cut from the built-in domains, 300 training images per class, the fill trained for one epoch;
  the same task added as #2 and as #N to fresh copies, the two sizes in turn; medians of the
  adds, and of each repeat's ratio with its range);
- routing + expert cost per image (``predict_features``, top-1, cached features: every built-in
  domain's test images, routed over many of the experts) at N-1 experts against 1 expert, the
  two zoos' calls alternating, each side's best of 20 calls; the median and range of the
  repeats' ratios; the same for fixed random draws of 8 and 32 of those images (a client's
  mixed batch reaches fewer experts); the same at 512-d features (ViT-B-32's width), on
  the embedded towers with a 512-d embedding and random weights, 100 training images per class;
- bytes per expert on disk: the built zoo's expert folders and router files, and the statistics
  plus router share for ViT-B-32-sized features (D=512, synthetic statistics).
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

from clipzoo.bench.growth import add_and_route, route_at_width, vit_bytes_per_expert
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


def cache_hits(root: Path, small: int, large: int, dim: int, probes: int, seed: int = 0, passes: int = 3) -> dict:
    """Per-image hit cost with ``small`` and with ``large`` cached entries (two caches holding the
    same probe images), measured in turn ``passes`` times, the best of each: load that drifts
    during the run weighs on both sizes alike."""
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
    probe_feats = torch.randn(len(files), dim, generator=gen)

    def filled(folder: str, total: int) -> FeatureCache:
        cache = FeatureCache(["bench-cost", str(dim)], root=root / folder)
        cache.put([cache.key(p) for p in files], probe_feats)  # also writes the key memo
        for start in range(len(files), total, 5000):
            n = min(5000, total - start)
            cache.put([f"synthetic-{start + j}" for j in range(n)], torch.randn(n, dim, generator=gen))
        return cache

    def fail(*_):
        raise AssertionError("a cached image was encoded")

    def one_pass(cache: FeatureCache) -> tuple[float, float]:
        t0 = time.perf_counter()
        for p in files:
            encode_cached([p], fail, fail, cache)
        single = (time.perf_counter() - t0) / len(files)
        t0 = time.perf_counter()
        encode_cached(files, fail, fail, cache)
        return single, (time.perf_counter() - t0) / len(files)

    caches = {"small": filled("features-small", small), "large": filled("features-large", large)}
    for cache in caches.values():
        for p in files[:8]:  # warm the OS page cache and the connection
            encode_cached([p], fail, fail, cache)
    best = {k: (float("inf"), float("inf")) for k in caches}
    for _ in range(passes):
        for k, cache in caches.items():
            best[k] = tuple(map(min, best[k], one_pass(cache)))
    out = {k: {"entries": len(caches[k]), "single_image_call_ms": round(1000 * best[k][0], 4),
               "batch_call_ms_per_image": round(1000 * best[k][1], 4)} for k in caches}
    shards = len(list((root / "features-large" / caches["large"].ns).glob("*.safetensors")))
    return {**out, "shards_at_large": shards, "passes": passes,
            "ratio_single": round(out["large"]["single_image_call_ms"] / out["small"]["single_image_call_ms"], 2),
            "ratio_batch": round(out["large"]["batch_call_ms_per_image"] / out["small"]["batch_call_ms_per_image"], 2)}


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


def remove_startup(zoo: Path, tmp: Path, runs: int, env: dict, help_s: float) -> dict:
    """``clipzoo remove`` of the first expert from a fresh copy of ``zoo`` (a ranpac router re-solved
    without it), ``runs`` times: median wall time, its ratio to ``--help``, the heavy modules imported."""
    import shutil

    experts = json.loads((zoo / "registry.json").read_text())["experts"]
    name, times, heavy = next(iter(experts)), [], []
    for _ in range(runs):
        copy = tmp / "zoo-remove"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(zoo, copy)
        dt, heavy = _cli(["remove", "--zoo", str(copy), "--name", name], env)
        times.append(dt)
    med = statistics.median(times)
    return {"experts_before": len(experts),
            "median_s": round(med, 4), "ratio_vs_help": round(med / help_s, 2), "heavy_modules_imported": heavy}


def run_cost(runs: int = 5, small: int = 1000, large: int = 50_000, dim: int = 512, probes: int = 200,
             zoo: Path | None = None, experts: int = 64, add_epochs: int = 20) -> dict:
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
                         "experts": experts, "add_epochs": add_epochs,
                         "zoo": "built: 1 clip-adapter expert (builtin:shapes) on clipzoo-tiny" if images else str(zoo)},
            "startup": startup(zoo, runs, env),
            "cache_hit": cache_hits(tmp / "hits", small, large, dim, probes),
        }
        if images:
            result["cached_predict"] = cached_predict(zoo, images, env)
        if experts >= 2:
            saved = os.environ.get("CLIPZOO_CACHE")
            os.environ["CLIPZOO_CACHE"] = env["CLIPZOO_CACHE"]  # the run's own cache, not the user's
            try:
                grow = add_and_route(tmp, experts, add_epochs)
                wide = route_at_width(tmp / "wide", 512, experts)
            finally:
                if saved is None:
                    os.environ.pop("CLIPZOO_CACHE", None)
                else:
                    os.environ["CLIPZOO_CACHE"] = saved
            result["remove"] = remove_startup(grow.pop("zoo"), tmp, runs, env, result["startup"]["median_s"]["--help"])
            result["add_and_route"], result["route_at_512d"] = grow, wide
            versions = grow["bytes_per_expert_embedded"]["router_versions_on_disk"]
            result["bytes_per_expert_vit_b_32"] = vit_bytes_per_expert(tmp, 512, versions=versions)
            result["bytes_per_expert_vit_b_32_at_64"] = vit_bytes_per_expert(tmp, 512, 64, versions=versions)
    s, c = result["startup"]["ratio_vs_help"], result["cache_hit"]
    result["targets"] = {"list_within_3x_help": s["list"] <= 3, "verify_within_3x_help": s["verify"] <= 3,
                         "cache_hit_within_1.5x_1k_to_50k": c["ratio_single"] <= 1.5 and c["ratio_batch"] <= 1.5}
    if "cached_predict" in result:
        result["targets"]["cached_predict_without_model"] = not result["cached_predict"]["no-fallback"]["model_built"]
    if "remove" in result:
        result["targets"]["remove_imports_no_torch"] = "torch" not in result["remove"]["heavy_modules_imported"]
    if "add_and_route" in result:
        g = result["add_and_route"]
        result["targets"].update({f"add_expert_{g['experts']}_within_1.2x_expert_2": g["ratio_add_last_vs_2"] <= 1.2,
                                  f"add_expert_{g['experts']}_within_1.2x_expert_2_2_class_task":
                                      g["ratio_add_last_vs_2_small"] <= 1.2,
                                  "router_refresh_under_25%_of_add": g["router_share_max"] < 0.25,
                                  "router_refresh_under_25%_of_add_2_class_task": g["router_share_max_small"] < 0.25})
        for where, r in (("", g), ("_at_512d", result["route_at_512d"])):  # the whole probe, then each draw
            for batch, x in [("", r), *((f"_batch_{b}", x) for b, x in r["by_batch"].items())]:
                result["targets"][f"route_{g['experts'] - 1}_within_1.5x_1{batch}{where}"] = x["ratio_route_last_vs_1"] <= 1.5
    return result


def _span(r: list[float]) -> str:
    """A range of per-repeat ratios, as the table writes it."""
    return f"{r[0]}-{r[1]}x"


def _route_cell(r: dict, n: int) -> str:
    """A routing ratio with its repeats' range and both sides' milliseconds per image."""
    ms = r["route_ms_per_image"]
    return (f"{r['ratio_route_last_vs_1']}x (repeats {_span(r['ratio_route_range'])}; "
            f"{ms['experts_1']} -> {ms[f'experts_{n - 1}']} ms)")


def _batch_rows(r: dict, n: int, where: str) -> list[tuple[str, str, str]]:
    """The routing rows of the smaller mixed batches (``by_batch``)."""
    return [(f"the same, {b}-image batches{where} ({x['distinct_experts']} distinct experts)", _route_cell(x, n), "1.5x")
            for b, x in r.get("by_batch", {}).items()]


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
    if "remove" in res:
        r = res["remove"]
        rows.append((f"`clipzoo remove` from a {r['experts_before']}-expert zoo (ranpac re-solved) vs `clipzoo --help`; "
                     "heavy modules imported", f"{r['ratio_vs_help']}x; {','.join(r['heavy_modules_imported']) or 'none'}",
                     "no torch"))
    if "add_and_route" in res:
        g, v = res["add_and_route"], res["bytes_per_expert_vit_b_32"]
        n, e = g["experts"], g["bytes_per_expert_embedded"]
        for tag, what in g["added_tasks"].items():
            tag = "" if tag == "_domain" else tag
            a2, an = g["adds"][f"expert_2{tag}"], g["adds"][f"expert_{n}{tag}"]
            task = f"{what['name']}: {what['classes']} classes, {what['train_images']:,} images"
            rows += [(f"add-task ({task}), cached features ({g['epochs']} epochs): expert #{n} vs #2",
                      f"{g['ratio_add_last_vs_2' + tag]}x (repeats {_span(g['ratio_add_range' + tag])}; "
                      f"{a2['add_seconds']} -> {an['add_seconds']} s)", "1.2x"),
                     (f"router refresh share of that add, #2 / #{n}",
                      f"{round(100 * a2['router_share'])}% / {round(100 * an['router_share'])}% "
                      f"({a2['router_seconds']} / {an['router_seconds']} s)", "under 25%")]
        rows.append((f"routing + expert per image, {n - 1} vs 1 experts ({g['probe_images']} cached images, top-1, "
                     f"routed to {g['probe_distinct_experts']} distinct experts)", _route_cell(g, n), "1.5x"))
        rows += _batch_rows(g, n, "")
        w = res.get("route_at_512d")
        if w:
            rows.append((f"the same at {w['dim']}-d features (ViT-B-32 width: the embedded towers with a {w['dim']}-d "
                         f"embedding, random weights; {w['probe_images']} images, {w['probe_distinct_experts']} "
                         "distinct experts)", _route_cell(w, n), "1.5x"))
            rows += _batch_rows(w, n, f" at {w['dim']}-d")
        rows += [("bytes per expert, embedded backbone (all files / experts)",
                  f"{e['total']:,} (stats {e['stats']:,}, router {e['router']:,}; {e['router_versions_on_disk']} router version on disk)",
                  "-"),
                 *[(f"bytes per expert, ViT-B-32 size (D=512), {w['tasks']} experts: stats + {w['router_kind']} router",
                    f"{w['total']:,} (stats {w['stats']:,}, router {w['router']:,} x {w['router_versions']})", "2x smaller")
                   for w in (v, res.get("bytes_per_expert_vit_b_32_at_64")) if w]]
    lines = ["| what | measured | target |", "|---|---|---|"] + [f"| {a} | {b} | {t} |" for a, b, t in rows]
    return "\n".join(lines)
