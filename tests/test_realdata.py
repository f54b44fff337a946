"""Issue 2's checks on real images (skipped with a message when the data is absent)."""

from __future__ import annotations

import pytest

from clipzoo.tasks.data import load_imagefolder
from clipzoo.bench.harness import BenchSettings, run_benchmark
from clipzoo.zoo.zoo import Zoo

pytestmark = pytest.mark.realdata
DOMAINS = ["mnist", "cifar10", "rsscn7"]


def test_three_real_domains_end_to_end(data_root, tmp_path):
    seq = [load_imagefolder(data_root / d) for d in DOMAINS]
    res = run_benchmark(seq, BenchSettings(epochs=10), out=tmp_path / "bench")
    zoo = Zoo.open(tmp_path / "bench" / "zoo")
    assert zoo.names == DOMAINS and zoo.verify()["ok"]
    m = res["metrics"]
    assert m["routing_accuracy"] > 0.8, m
    assert m["task_agnostic_acc"] > m["oracle_acc"] - 0.1, m
    assert m["task_agnostic_acc"] > res["baselines"]["naive"]["last"] + 0.1, res["baselines"]["naive"]
    assert m["forgetting"] < res["baselines"]["naive"]["forgetting"]
    assert res["baselines"]["zoo-oracle"]["forgetting"] == 0.0


def test_first_expert_unchanged_and_verify_catches_a_byte(data_root, tmp_path):
    z = Zoo.create(tmp_path / "zoo")
    from clipzoo.zoo.train import TrainSettings

    fast = TrainSettings(epochs=3)
    z.add_task(data_root / DOMAINS[0], train=fast)
    first = {f: (z.expert_dir(DOMAINS[0]) / f).read_bytes() for f in z.record(DOMAINS[0])["files"]}
    sha = z.record(DOMAINS[0])["sha256"]
    for d in DOMAINS[1:]:
        z.add_task(data_root / d, train=fast)
    z = Zoo.open(z.root)
    assert z.record(DOMAINS[0])["sha256"] == sha
    assert {f: (z.expert_dir(DOMAINS[0]) / f).read_bytes() for f in first} == first
    assert z.verify()["ok"]
    cfg = z.expert_dir(DOMAINS[1]) / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"{", b"{ ", 1))
    assert not z.verify()["ok"]
