"""Figures for the Ray executor: a sweep's wall time local vs Ray, Ray's fixed overhead, encoding.

``python -m clipzoo.bench.ray_bench --data-dir ../shared/data --out ray-bench.json`` measures, on
this machine, with every domain of ``--data-dir`` in order:

- ``encode``: frozen features of every train and test image, into an empty feature cache: in this
  process (:func:`clipzoo.zoo.cache.backbone_features`) vs sharded over the Ray workers
  (:func:`clipzoo.zoo.parallel.encode_sharded`), once on a fresh cluster (the workers' start-up
  included) and once more on the started workers;
- ``sweep``: ``clipzoo bench`` with ``--orders`` x ``--seeds`` runs (default 3 x 2), local vs Ray
  (one run per worker; features already cached, so both time the runs and their shared tuning);
- ``overhead``: the same for a 1-run sweep: what Ray adds when nothing runs in parallel
  (``ray.init`` of a local instance timed apart).

It prints and writes one JSON document with the machine (CPUs, load average before and after:
the figures are wall times, so a busy machine slows both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from clipzoo.bench.executor import RayExecutor
from clipzoo.bench.harness import BenchSettings, machine_info, run_benchmark
from clipzoo.runtime import disable_progress_bars, set_cache_root
from clipzoo.tasks.sequence import load_sequence
from clipzoo.zoo import parallel


def _sweep(seq, settings: BenchSettings, out: Path, executor=None) -> float:
    t0 = time.perf_counter()
    run_benchmark(seq, settings, out=out, executor=executor)
    return round(time.perf_counter() - t0, 2)


def measure(data_dir: Path, workers: int, orders: int, seeds: int, epochs: int, methods: list[str] | None,
            sweep_only: bool = False) -> dict:
    from clipzoo.zoo.backbone import load_backbone
    from clipzoo.zoo.cache import backbone_features

    ray = parallel.import_ray()
    disable_progress_bars()
    seq = load_sequence([str(data_dir)])
    images = [im for t in seq for split in (t.train, t.test) for im in split.images]
    base = {} if methods is None else {"methods": methods}
    sweep = BenchSettings(epochs=epochs, orders=orders, seeds=seeds, **base)
    one = BenchSettings(epochs=epochs, **base)
    info = {"machine": {**machine_info(), "load_avg_before": os.getloadavg()}, "domains": [t.name for t in seq],
            "images": len(images), "workers": workers, "epochs": epochs, "methods": sweep.methods,
            "runs": orders * seeds}
    with tempfile.TemporaryDirectory(prefix="clipzoo-ray-bench-") as tmp:
        tmp = Path(tmp)
        bb = load_backbone()
        set_cache_root(tmp / "cache-local")
        t0 = time.perf_counter()
        backbone_features(bb, images)
        local_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 logging_level="WARNING")
        init_s = time.perf_counter() - t0
        try:
            if not sweep_only:
                info["encode"] = _encode_sharded(bb, images, workers, local_enc, tmp)
                ray_one = _sweep(seq, one, tmp / "ray-1", RayExecutor())
            ray_many = _sweep(seq, sweep, tmp / "ray-n", RayExecutor())
            info["machine"]["load_avg_after_ray_sweep"] = os.getloadavg()
        finally:
            ray.shutdown()
        local_one = None if sweep_only else _sweep(seq, one, tmp / "local-1")
        local_many = _sweep(seq, sweep, tmp / "local-n")
        set_cache_root(None)
    info["sweep"] = {"local_s": local_many, "ray_s": ray_many, "speedup": round(local_many / ray_many, 2)}
    info["machine"]["load_avg_after"] = os.getloadavg()
    if sweep_only:
        return info
    info["overhead"] = {"ray_init_s": round(init_s, 2), "local_1run_s": local_one, "ray_1run_s": ray_one,
                        "ray_minus_local_s": round(ray_one - local_one, 2)}
    return info


def _encode_sharded(bb, images: list, workers: int, local_s: float, tmp: Path) -> dict:
    """Sharded encoding into an empty cache on the fresh cluster, then again on started workers."""
    times = []
    for name in ("cache-ray", "cache-ray-warm"):
        set_cache_root(tmp / name)
        t0 = time.perf_counter()
        parallel.encode_sharded(bb, images, shards=workers)
        times.append(time.perf_counter() - t0)
    n = len(images)
    return {"local_s": round(local_s, 2), "local_images_per_s": round(n / local_s, 1),
            "ray_sharded_s": round(times[0], 2), "ray_images_per_s": round(n / times[0], 1),
            "ray_warm_s": round(times[1], 2), "ray_warm_images_per_s": round(n / times[1], 1), "shards": workers,
            "note": "each into an empty cache; ray_sharded_s includes starting the workers (a fresh cluster), "
                    "ray_warm_s is the same pass again on started workers"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="a folder of ImageFolder domains")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs (one run or shard per CPU)")
    p.add_argument("--orders", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--methods", default=None, help="comma-separated baselines (default: every baseline)")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep (features cached first, untimed)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    res = measure(a.data_dir, a.workers, a.orders, a.seeds, a.epochs, methods, a.sweep_only)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
