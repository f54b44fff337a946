"""Beyond one machine: benchmark runs, sharded encoding and batches of new tasks on a local Ray
cluster (``ray.init(num_cpus=2)``, one per test session), and the same batches on worker processes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from clipzoo.bench.executor import LocalExecutor, RayExecutor, make_executor
from clipzoo.bench.harness import METHODS, BenchSettings, run_benchmark
from clipzoo.cli import main
from clipzoo.errors import ConfigError
from clipzoo.tasks.data import load_builtin, write_imagefolder
from clipzoo.tasks.metrics import MATRIX_KEYS
from clipzoo.zoo import parallel
from clipzoo.zoo.zoo import Zoo

# baselines that train (with their names before and after the adapter-/ft- split)
TRAINED = [m for m in ("naive", "ewc", "adapter-naive", "adapter-ewc") if m in METHODS]
FAST = dict(epochs=2, batch_size=32, methods=["zero-shot", "slda", *TRAINED], tune=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance on 2 CPUs for the whole session, shut down after it."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install -e '.[ray]'): the Ray executor tests need it")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def seq():
    return [load_builtin(d, n_train=10, n_test=4) for d in ("shapes", "colours", "digits")]


def _matrices(res: dict) -> dict:
    return {(r["id"], m): r["methods"][m]["acc_matrix"] for r in res["runs"] for m in r["methods"]}


@pytest.mark.realdata
def test_bench_on_ray_gives_the_local_matrices(data_root, ray_cluster, tmp_path):
    """Two real domains, two seeds: `clipzoo bench --executor ray` (the CLI) writes the report a
    local run writes, with the same accuracy matrices for every run and method."""
    domains = [str(data_root / "flowers"), str(data_root / "skin_lesion")]
    common = ["--epochs", "2", "--seeds", "2", "--methods", f"zero-shot,{TRAINED[0]}", "--json"]
    local = CliRunner().invoke(main, ["bench", *domains, *common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    out = tmp_path / "ray"
    res = CliRunner().invoke(main, ["bench", *domains, *common, "--out", str(out), "--executor", "ray"])
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "local" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert len(b["runs"]) == 2 and _matrices(a) == _matrices(b)
    for method, agg in a["aggregate"].items():  # the accuracy metrics; timings differ
        assert {k: agg[k] for k in MATRIX_KEYS} == {k: b["aggregate"][method][k] for k in MATRIX_KEYS}, method
    assert b["settings"]["executor"]["executor"] == "ray" and a["settings"]["executor"] == {"executor": "local"}
    assert all((out / f).is_file() for f in ("report.md", "acc_matrix.png", "acc_curves.png"))
    assert (out / "zoo" / "registry.json").is_file() and (out / "runs" / "o0-s1" / "zoo" / "registry.json").is_file()


class KillingExecutor(RayExecutor):
    """Kills the worker of run ``victim`` (os._exit) once its first step is checkpointed, on the
    first attempt only (a marker file remembers it)."""

    victim = "o0-s1"

    def runs(self, run_fn, jobs, *args):
        victim = self.victim

        def run_or_die(rid, order, seed, tasks, feats, bb, s, run_dir, zoo_dir, resume, held):  # pickled by value
            import os
            import threading
            import time

            marker = run_dir.parent / "killed-once"
            if rid == victim and not marker.exists():
                marker.touch()

                def kill_after_first_step():
                    while not (run_dir / "steps" / "step_000.json").exists():
                        time.sleep(0.01)
                    os._exit(1)

                threading.Thread(target=kill_after_first_step, daemon=True).start()
            return run_fn(rid, order, seed, tasks, feats, bb, s, run_dir, zoo_dir, resume, held)

        return super().runs(run_or_die, jobs, *args)


def test_a_killed_worker_is_retried_and_resumed_once(ray_cluster, seq, tmp_path):
    ref = run_benchmark(seq, BenchSettings(**FAST, seeds=2), out=tmp_path / "local")
    out = tmp_path / "ray"
    res = run_benchmark(seq, BenchSettings(**FAST, seeds=2), out=out, executor=KillingExecutor())
    assert (out / "runs" / "killed-once").is_file()  # the victim's first attempt ran and died
    assert [r["id"] for r in res["runs"]] == ["o0-s0", "o0-s1"]  # each run counted once
    victim = res["runs"][1]
    assert victim["resumed_from_step"] is not None and victim["resumed_from_step"] >= 1  # resumed, not restarted
    assert res["runs"][0]["resumed_from_step"] is None
    assert _matrices(res) == _matrices(ref)
    report = json.loads((out / "report.json").read_text())
    assert [r["id"] for r in report["runs"]] == ["o0-s0", "o0-s1"]
    zoo = Zoo.open(out / "runs" / "o0-s1" / "zoo")
    assert zoo.names == [t.name for t in seq] and zoo.verify()["ok"]
    assert not list((out / "runs" / "o0-s1" / "zoo").glob(".staging*"))


def test_sharded_encoding_fills_the_cache_once(ray_cluster, tmp_path, monkeypatch):
    from clipzoo.runtime import set_cache_root
    from clipzoo.zoo.backbone import load_backbone
    from clipzoo.zoo.cache import FeatureCache, encode_cached

    task = load_builtin("textures", n_train=40, n_test=8)
    folder = write_imagefolder(task, tmp_path / "textures")
    images = sorted((folder / "train").rglob("*.png"))
    images.append(images[0])  # a duplicate: one content, encoded once
    set_cache_root(tmp_path / "cache")
    try:
        bb = load_backbone()
        feats = parallel.encode_sharded(bb, images, shards=3)
        with torch.no_grad():
            direct = encode_cached(images, bb.preprocess, bb.encode_images, None)
        assert feats.shape == direct.shape and torch.allclose(feats, direct, atol=1e-5)
        cache = FeatureCache([bb.fingerprint, bb.preprocess_id])
        assert len(cache) == len(images) - 1
        monkeypatch.setattr(parallel, "ray_map", lambda *a, **k: pytest.fail("a cached image was encoded again"))
        assert torch.equal(parallel.encode_sharded(bb, images, shards=3), feats)
    finally:
        set_cache_root(None)
    assert parallel.shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)] and parallel.shard_bounds(2, 5) == [(0, 1), (1, 2)]


def test_add_tasks_on_ray(ray_cluster, builtin_tasks, tmp_path):
    zoo = Zoo.create(tmp_path / "zoo")
    jobs = [{"name": n, "data": builtin_tasks[n], "train": {"epochs": 2, "batch_size": 32}} for n in ("shapes", "digits")]
    outcomes = zoo.add_tasks(jobs, executor="ray")
    assert [o["ok"] for o in outcomes] == [True, True], outcomes
    assert sorted(zoo.names) == ["digits", "shapes"] and zoo.verify()["ok"]
    again = Zoo.open(tmp_path / "zoo")
    assert sorted(again.names) == ["digits", "shapes"]
    assert {p["task"] for p in again.predict(builtin_tasks["digits"].test.images[:4])} <= {"digits", "shapes"}


def test_add_several_tasks_in_worker_processes_one_failing(builtin_tasks, tmp_path):
    """`add-task` with three --data, two workers: the good tasks are committed, the bad one is an
    error line, the JSON lists every outcome, the exit status is 1."""
    run = CliRunner()
    data = [str(write_imagefolder(builtin_tasks[d], tmp_path / "data" / d)) for d in ("shapes", "colours")]
    bad = tmp_path / "data" / "one_class"
    write_imagefolder(builtin_tasks["digits"], tmp_path / "tmpdigits")
    for split in ("train", "test"):
        (bad / split / "only").mkdir(parents=True)
        for k, f in enumerate(sorted((tmp_path / "tmpdigits" / split).rglob("*.png"))[:3]):
            (bad / split / "only" / f"{k}.png").write_bytes(f.read_bytes())
    zoo = tmp_path / "zoo"
    assert run.invoke(main, ["init", "--zoo", str(zoo)]).exit_code == 0
    args = ["add-task", "--zoo", str(zoo), "--data", data[0], "--data", str(bad), "--data", data[1],
            "--epochs", "2", "--workers", "2", "--json"]
    res = run.invoke(main, args)
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [(o["name"], o["ok"]) for o in doc["tasks"]] == [("shapes", True), ("one_class", False), ("colours", True)]
    assert "class" in doc["tasks"][1]["error"] and "error: task one_class:" in res.stderr
    listed = json.loads(run.invoke(main, ["list", "--zoo", str(zoo), "--json"]).stdout)
    assert sorted(r["name"] for r in listed) == ["colours", "shapes"]
    assert run.invoke(main, ["verify", "--zoo", str(zoo)]).exit_code == 0
    dup = run.invoke(main, ["add-task", "--zoo", str(zoo), "--data", data[0], "--data", data[0]])
    assert dup.exit_code == 1 and "given twice" in dup.stderr
    names = run.invoke(main, ["add-task", "--zoo", str(zoo), "--name", "a", "--data", data[0], "--data", data[1]])
    assert names.exit_code == 1 and "one --name per --data" in names.stderr


def test_executor_choice_without_ray(monkeypatch):
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ConfigError, match="--address needs --executor ray"):
        make_executor("local", "auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'clipzoo\[ray\]'"):
        make_executor("ray")
