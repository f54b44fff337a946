"""Checks on real images (skipped when the data is absent; CI sets CLIPZOO_REQUIRE_DATA=1, which
makes a missing data directory a failure): a short benchmark on 2 real domains and the relations
it must satisfy, and the zoo's old experts staying byte-identical."""

from __future__ import annotations

import pytest
import torch

from clipzoo.bench import baselines as B
from clipzoo.bench import harness
from clipzoo.bench.harness import BenchSettings, run_benchmark
from clipzoo.tasks.data import load_imagefolder
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

pytestmark = pytest.mark.realdata
DOMAINS = ["mnist", "cifar10", "rsscn7"]
BENCH = ["zero-shot", "slda", "adapter-naive", "adapter-ewc", "adapter-lwf", "adapter-zscl"]


@pytest.fixture(scope="module")
def short_bench(data_root, tmp_path_factory):
    """2 real domains, 5 epochs, the continual adapter baselines (joint, the fine-tuning baselines and the
    cross-checks left out for time; tests/test_finetune.py covers the fine-tuning ones)."""
    seq = [load_imagefolder(data_root / d) for d in DOMAINS[:2]]
    out = tmp_path_factory.mktemp("bench")
    res = run_benchmark(seq, BenchSettings(epochs=5, methods=BENCH), out=out)
    bb = harness.load_backbone(harness.BackboneSpec("clipzoo-tiny", "embedded"))
    return seq, res, Zoo.open(out / "zoo"), bb, harness._encode(seq, bb)


def test_short_real_benchmark_relations(short_bench):
    seq, res, zoo, _, _ = short_bench
    assert zoo.names == DOMAINS[:2] and zoo.verify()["ok"]
    oracle, m, b = res["baselines"]["zoo-oracle"], res["metrics"], res["baselines"]
    assert oracle["forgetting"] == 0.0 and oracle["bwt"] == 0.0  # experts never change: exactly 0
    assert oracle["acc_matrix"][1][0] == oracle["acc_matrix"][0][0]
    # a routed answer is right only if routed to the right expert, whose answer is the oracle's
    assert m["task_agnostic_acc"] <= min(m["oracle_acc"], m["routing_accuracy"]) + 1e-9, m
    naive = b["adapter-naive"]
    assert m["routing_accuracy"] > 0.8 and m["forgetting"] < naive["forgetting"], (m, naive)
    assert b["slda"]["train_seconds"] < naive["train_seconds"] and b["slda"]["trainable_params"] == 0
    assert res["settings"]["tuning"]["tuned"] and res["settings"]["tuning"]["val_sizes"][0][1] > 0


def test_a_misrouted_or_fallback_answer_is_scored_wrong(short_bench):
    """Answers carrying the oracle's (right) label but the wrong task, or flagged fallback, score 0."""
    seq, _, zoo, bb, feats = short_bench
    truth = {id(f[2]): t.name for f, t in zip(feats, seq)}

    class Wrong:
        def __init__(self, how: str):
            self.how = how

        def predict_features(self, x, task=None):
            right = zoo.predict_features(x, task=truth[id(x)])
            if task is not None:
                return right
            if self.how == "misrouted":
                other = next(n for n in zoo.names if n != truth[id(x)])
                return [{**p, "task": other, "fallback": False} for p in right]
            return [{**p, "task": None, "fallback": True} for p in right]

    zs = [B.ZeroShot([bb.class_embeddings(t.classes, t.templates) for t in seq], bb.logit_scale)]
    for how in ("misrouted", "fallback"):
        ev = harness._evaluate_step(1, seq, feats, Wrong(how), zs)
        assert ev["rows"]["zoo"] == [0.0, 0.0] and ev["pooled"]["zoo"]["agnostic"] == 0, how
        assert min(ev["rows"]["zoo-oracle"]) > 0.2 and ev["routed"] == 0
        assert ev["fallback"] == (ev["n_seen"] if how == "fallback" else 0)


def test_each_regulariser_changes_training_versus_naive(short_bench):
    """Same seed, same data: after the first task EWC and LwF equal naive (their terms need an old
    task; ZSCL's acts at once), after the second each differs; EWC with lambda 0 stays naive."""
    seq, _, _, bb, feats = short_bench
    embs = [bb.class_embeddings(t.classes, t.templates) for t in seq]
    train, scale = TrainSettings(epochs=2, seed=0), bb.logit_scale
    make = {"naive": lambda: B.NaiveSequential(embs, scale, train), "ewc": lambda: B.EWC(embs, scale, train),
            "ewc0": lambda: B.EWC(embs, scale, train, lam=0.0), "lwf": lambda: B.LwF(embs, scale, train),
            "zscl": lambda: B.ZSCL(embs, scale, train)}
    weights = {}
    for name, new in make.items():
        torch.manual_seed(0)
        m = new()
        weights[name] = []
        for t in range(2):
            torch.manual_seed(t)
            m.learn(t, feats[t][0][:300], feats[t][1][:300])
            weights[name].append({k: v.clone() for k, v in m.model.state_dict().items()})

    def same(a: str, b: str, step: int) -> bool:
        return all(torch.equal(weights[a][step][k], weights[b][step][k]) for k in weights[a][step])

    assert same("ewc", "naive", 0) and same("lwf", "naive", 0) and not same("zscl", "naive", 0)
    for name in ("ewc", "lwf", "zscl"):
        assert not same(name, "naive", 1), name
    assert same("ewc0", "naive", 1)


def test_first_expert_unchanged_and_verify_catches_a_byte(data_root, tmp_path):
    z = Zoo.create(tmp_path / "zoo")
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
