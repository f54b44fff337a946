"""Paying for the work, not the ceremony (issue 15): light commands import no torch, the feature
cache's index is persistent and safe under concurrent writers, memos are invalidated by change,
predict survives an unwritable cache, and cached features need no model. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO
from clipzoo.cli import main

HEAVY = ("torch", "open_clip", "sklearn")


@pytest.fixture(scope="module")
def zoo_and_images(tmp_path_factory, builtin_tasks) -> tuple[Path, list[Path]]:
    """One expert with a learned router file, and three test images of its task."""
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    base = tmp_path_factory.mktemp("cost")
    z = Zoo.create(base / "zoo")
    z.add_task(builtin_tasks["shapes"], train=TrainSettings(epochs=2, batch_size=32))
    images = []
    for i, im in enumerate(builtin_tasks["shapes"].test.images[:3]):
        images.append(base / f"img{i}.png")
        im.save(images[-1])
    return z.root, images


def heavy_imports(*args: str, env: dict | None = None) -> tuple[int, list[str], str]:
    """Run ``clipzoo ARGS`` in a fresh interpreter; its exit code and the heavy modules it imported."""
    code = textwrap.dedent("""
        import sys
        from clipzoo.cli import main
        try:
            main(sys.argv[1:], prog_name="clipzoo")
        except SystemExit as e:
            code = e.code or 0
        else:
            code = 0
        sys.stderr.write("\\nHEAVY=" + ",".join(m for m in %r if m in sys.modules) + "\\n")
        sys.exit(code)
    """ % (HEAVY,))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})}, cwd=REPO)
    heavy = r.stderr.rsplit("HEAVY=", 1)[-1].strip()
    return r.returncode, [m for m in heavy.split(",") if m], r.stdout + r.stderr


@pytest.mark.parametrize("args", [("--help",), ("list",), ("list", "--json"), ("verify",), ("router",),
                                  ("router", "--json")])
def test_light_commands_import_no_torch(zoo_and_images, args):
    zoo, _ = zoo_and_images
    full = list(args) if args == ("--help",) else [args[0], "--zoo", str(zoo), *args[1:]]
    code, heavy, out = heavy_imports(*full)
    assert code == 0, out
    assert heavy == [], f"clipzoo {' '.join(args)} imported {heavy}"


@pytest.mark.parametrize("stats", ["intact", "damaged"])
def test_remove_imports_no_torch_and_leaves_the_router_it_would_build(served_zoo, tmp_path, stats):
    """The ranpac router subtracts the removed task's scatter, or, when its stats cannot be read,
    is rebuilt from the others' (numpy arrays either way)."""
    import shutil

    from clipzoo.router.ranpac import RanpacRouter
    from clipzoo.zoo.zoo import Zoo

    zoo = Path(shutil.copytree(served_zoo[0], tmp_path / "zoo"))
    before = Zoo.open(zoo)
    assert len(before.names) == 2
    if stats == "damaged":
        f = zoo / "experts" / before.names[0] / "stats.safetensors"
        f.write_bytes(f.read_bytes()[:-3])
    code, heavy, out = heavy_imports("remove", "--zoo", str(zoo), "--name", before.names[0], "--json")
    assert code == 0, out
    assert heavy == []
    after = Zoo.open(zoo)
    assert after.names == before.names[1:] and after.verify()["ok"]
    fresh = RanpacRouter.from_stats({n: after.stats(n) for n in after.names})
    x = torch.randn(6, after.registry["backbone"]["embed_dim"])
    torch.testing.assert_close(after.router().scores(x), fresh.scores(x), rtol=1e-3, atol=1e-3)


def test_light_verify_agrees_with_the_full_one(zoo_and_images, tmp_path):
    import shutil

    from clipzoo.zoo.quick_verify import CONFIG_KEYS, STATS_FIELDS, light_verify
    from clipzoo.router.stats import TaskStats
    from clipzoo.zoo.experts import base
    from clipzoo.zoo.zoo import Zoo

    assert tuple(CONFIG_KEYS) == tuple(base.CONFIG_KEYS)
    assert set(STATS_FIELDS) == {f.name for f in fields(TaskStats)}
    zoo = Path(shutil.copytree(zoo_and_images[0], tmp_path / "zoo"))
    assert light_verify(zoo) == Zoo.open(zoo).verify()
    w = zoo / "experts" / "shapes" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))
    assert light_verify(zoo) is None  # the full check then names the problem
    from clipzoo.zoo.quick_verify import _tensor_names

    stats = zoo / "experts" / "shapes" / "stats.safetensors"
    assert _tensor_names(stats) == set(STATS_FIELDS)
    for bad in (stats.read_bytes()[:-3], b"\x80\x04pickle", b""):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        assert _tensor_names(tmp_path / "bad.safetensors") is None
    res = CliRunner().invoke(main, ["verify", "--zoo", str(zoo)])
    assert res.exit_code == 1 and "shapes/weights.safetensors: sha256 mismatch" in res.output


# ----- the feature cache ---------------------------------------------------------------------------------
WRITER = """
import sys, torch
from pathlib import Path
from clipzoo.zoo.cache import FeatureCache
root, tag, calls, rows = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cache = FeatureCache(["concurrent"], root=root)
for c in range(calls):
    keys = [f"{tag}-{c}-{i}" for i in range(rows)]
    cache.put(keys, torch.tensor([[float(c), float(i), float(len(tag))] for i in range(rows)]))
"""


def test_cache_index_survives_concurrent_writers(tmp_path):
    from clipzoo.zoo.cache import FeatureCache

    root = tmp_path / "features"
    # one writer of shards (100 rows per call) and one of inline rows (3 per call), at the same time
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), tag, "30", rows], cwd=REPO)
             for tag, rows in (("a", "100"), ("bb", "3"))]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    cache = FeatureCache(["concurrent"], root=root)
    assert len(cache) == 30 * 100 + 30 * 3
    got = cache.get([f"a-{c}-{i}" for c in range(30) for i in range(100)] + [f"bb-{c}-{i}" for c in range(30)
                                                                              for i in range(3)])
    assert len(got) == 3090
    assert got["a-7-42"].tolist() == [7.0, 42.0, 1.0] and got["bb-29-2"].tolist() == [29.0, 2.0, 2.0]
    con = __import__("sqlite3").connect(str(root / "index.sqlite"))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(list((root / cache.ns).glob("*.safetensors"))) == 30  # small writes made no shard files


def test_a_hit_reads_only_the_requested_rows(tmp_path, monkeypatch):
    import safetensors

    from clipzoo.zoo.cache import FeatureCache

    cache = FeatureCache(["rows"], root=tmp_path)
    cache.put([f"k{i}" for i in range(1000)], torch.arange(1000.0)[:, None].repeat(1, 4))
    read: list[tuple[int, int]] = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            raise AssertionError("a hit must not read a whole shard")

        def get_slice(self, name):
            sl = self.f.get_slice(name)

            class Slice:
                def get_shape(self):
                    return sl.get_shape()

                def __getitem__(self, s):
                    read.append((s.start, s.stop))
                    return sl[s]
            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    got = cache.get(["k5", "k6", "k500", "missing"])
    assert sorted(got) == ["k5", "k500", "k6"] and got["k500"].tolist() == [500.0] * 4
    assert sorted(read) == [(5, 7), (500, 501)]


def test_key_memo_is_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    from clipzoo.zoo import cache as cache_mod

    img = tmp_path / "a.png"
    img.write_bytes(b"first version")
    hashed: list[str] = []
    real = cache_mod.content_key
    monkeypatch.setattr(cache_mod, "content_key", lambda src: hashed.append(str(src)) or real(src))
    c = cache_mod.FeatureCache(["memo"], root=tmp_path / "features")
    k1 = c.key(img)
    c.flush_keys()
    assert c.key(img) == k1 and len(hashed) == 1  # memo hit: not hashed again
    img.write_bytes(b"second version!")  # size changes
    k2 = c.key(img)
    assert k2 != k1 and len(hashed) == 2
    c.flush_keys()
    st = img.stat()
    img.write_bytes(b"third  version!")  # same size, then the same mtime as before
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert c.key(img) == real(img) != k2 and len(hashed) == 3  # ctime moved: hashed again


def test_backbone_fingerprint_memo(tmp_path, monkeypatch):
    import shutil

    from clipzoo.runtime import set_cache_root
    from clipzoo.zoo import backbone as bbm

    weights = tmp_path / "tiny.safetensors"
    shutil.copy(bbm.EMBEDDED_WEIGHTS, weights)
    spec = bbm.BackboneSpec(bbm.TINY_MODEL, str(weights))
    k1 = bbm.memo_key(spec)
    assert k1 and bbm.memo_key(spec) == k1
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    k2 = bbm.memo_key(spec)
    assert k2 != k1
    with open(weights, "ab") as f:
        f.write(b"\0")
    assert bbm.memo_key(spec) not in (k1, k2)
    assert bbm.memo_key(bbm.BackboneSpec("ViT-B-32", "laion2b_s34b_b79k")) is None  # a tag: never memoised
    shutil.copy(bbm.EMBEDDED_WEIGHTS, weights)
    set_cache_root(tmp_path / "cache")
    try:
        bbm.load_backbone.cache_clear()
        full = bbm.load_backbone(spec)
        assert full.built
        bbm.load_backbone.cache_clear()
        lazy = bbm.load_backbone(spec)
        assert not lazy.built and lazy.fingerprint == full.fingerprint
        assert lazy.preprocess_id == full.preprocess_id and lazy.embed_dim == full.embed_dim
        assert torch.allclose(lazy.encode_images(torch.zeros(1, 3, 32, 32)), full.encode_images(torch.zeros(1, 3, 32, 32)))
        assert lazy.built
    finally:
        set_cache_root(None)
        bbm.load_backbone.cache_clear()


def test_cached_predict_builds_no_model(zoo_and_images):
    from clipzoo.zoo.backbone import load_backbone
    from clipzoo.zoo.zoo import Zoo

    zoo, images = zoo_and_images
    first = Zoo.open(zoo).predict(images, fallback=False)
    load_backbone.cache_clear()
    z = Zoo.open(zoo)
    assert z.predict(images, fallback=False) == first
    assert not z.backbone.built


@pytest.mark.parametrize("how", ["a file", "read-only"])
def test_predict_with_an_unwritable_cache(zoo_and_images, tmp_path, monkeypatch, how):
    zoo, images = zoo_and_images
    if how == "a file":  # the cache root cannot even be created
        root = tmp_path / "cache-file"
        root.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        root = tmp_path / "ro-cache"
        root.mkdir()
        root.chmod(0o555)
    res = CliRunner().invoke(main, ["predict", "--zoo", str(zoo), "--json", *map(str, images)],
                             env={"CLIPZOO_CACHE": str(root)})
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout if hasattr(res, "stdout") else res.output)
    assert len(preds) == 3 and all("label" in p for p in preds)


def test_predict_on_a_full_disk(zoo_and_images, tmp_path, monkeypatch):
    import errno

    from clipzoo.zoo import cache as cache_mod
    from clipzoo.zoo.zoo import Zoo

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("CLIPZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_mod.FeatureCache, "_write", lambda self, fn: self._disable(OSError(errno.ENOSPC,
                                                                                                "No space left")))
    zoo, images = zoo_and_images
    monkeypatch.setattr("clipzoo.zoo.registry.atomic_write_bytes", full)
    preds = Zoo.open(zoo).predict(images * 30, fallback=False)  # no cache write succeeds
    assert len(preds) == 90 and all("label" in p for p in preds)


def test_set_threads(monkeypatch):
    from clipzoo import runtime

    before = torch.get_num_threads()
    monkeypatch.setenv("CLIPZOO_THREADS", "1")
    try:
        assert runtime.set_threads() == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1" and runtime.threads() == 1
    finally:
        runtime.set_threads(before)
    monkeypatch.setenv("CLIPZOO_THREADS", "zero")
    with pytest.raises(Exception, match="CLIPZOO_THREADS"):
        runtime.default_threads()


def test_add_and_route_measures_distinct_experts(tmp_path):
    """bench-cost's add and routing rows on a small zoo of distinct two-class tasks: each figure
    is there, measured, and the probe is routed to more than one expert."""
    from clipzoo.bench.growth import add_and_route

    g = add_and_route(tmp_path, experts=4, epochs=1, repeats=2, n_train=6)
    assert set(g["adds"]) == {"expert_2", "expert_4", "expert_2_small", "expert_4_small"} and g["probe_images"] > 0
    assert g["added_tasks"]["_small"]["classes"] == 2 and g["added_tasks"]["_domain"]["classes"] > 2
    for a in g["adds"].values():
        assert 0 < a["router_seconds"] < a["add_seconds"] and 0 < a["router_share"] < 1
    assert set(g["route_ms_per_image"]) == {"experts_1", "experts_3"} and g["ratio_route_last_vs_1"] > 0
    lo, hi = g["ratio_route_range"]
    assert lo <= g["ratio_route_last_vs_1"] <= hi and g["ratio_add_range_small"][0] <= g["ratio_add_last_vs_2_small"]
    assert 1 < g["probe_distinct_experts"] <= 3
    assert set(g["by_batch"]) == {"8", "32"}  # fixed draws of the probe, each timed like it
    for b, x in g["by_batch"].items():
        assert 1 <= x["distinct_experts"] <= min(int(b), 3) and x["route_ms_per_image"]["experts_3"] > 0
        assert x["ratio_route_range"][0] <= x["ratio_route_last_vs_1"] <= x["ratio_route_range"][1]
    from clipzoo.bench.cost import _batch_rows, remove_startup

    names = [r[0] for r in _batch_rows(g, 4, "")]
    assert len(names) == 2 and "8-image batches" in names[0] and "32-image batches" in names[1]

    r = remove_startup(g["zoo"], tmp_path, 1, dict(os.environ), help_s=1.0)
    assert r["experts_before"] == 3 and r["heavy_modules_imported"] == [] and r["median_s"] > 0
    assert len(json.loads((g["zoo"] / "registry.json").read_text())["experts"]) == 3  # a copy was changed


def test_cache_hits_measure_two_cache_sizes_without_encoding(tmp_path):
    """bench-cost's cache rows: two caches of the asked sizes hold the same probe images, every
    probe is a hit (an encode would fail the run), and both ratios are computed from the figures."""
    from clipzoo.bench.cost import cache_hits

    r = cache_hits(tmp_path, small=30, large=5100, dim=8, probes=12, passes=2)
    assert (r["small"]["entries"], r["large"]["entries"]) == (30, 5100) and r["shards_at_large"] >= 1
    for k in ("single", "batch"):
        name = "single_image_call_ms" if k == "single" else "batch_call_ms_per_image"
        assert r[f"ratio_{k}"] == round(r["large"][name] / r["small"][name], 2) > 0


def test_route_at_width_builds_a_wide_zoo_and_measures_both_sizes(tmp_path):
    """bench-cost's 512-d routing row: the zoo's features have the asked width, both sizes are
    measured and the probe reaches more than one expert."""
    from clipzoo.bench.growth import route_at_width
    from clipzoo.zoo.zoo import Zoo

    w = route_at_width(tmp_path, 32, experts=4, repeats=1, n_train=6)
    assert w["dim"] == 32 and set(w["route_ms_per_image"]) == {"experts_1", "experts_3"}
    assert all(v > 0 for v in w["route_ms_per_image"].values()) and 1 < w["probe_distinct_experts"] <= 3
    assert set(w["by_batch"]) == {"8", "32"}
    assert Zoo.open(tmp_path / "zoo-n").router().dim == 32
