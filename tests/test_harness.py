"""The benchmark harness on small built-in sequences: report layout, baselines, orders, resume, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from clipzoo.bench import baselines, tuning
from clipzoo.bench.slda import SLDA
from clipzoo.tasks.data import load_builtin, write_imagefolder
from clipzoo.bench.harness import METHODS, BenchSettings, run_benchmark
from clipzoo.tasks.metrics import MATRIX_KEYS
from clipzoo.tasks.sequence import expand_domains, load_sequence, split_holdout, task_orders
from clipzoo.tasks.validation import validation_split
from clipzoo.cli import main
from clipzoo.errors import ConfigError

FAST = dict(epochs=2, batch_size=32, ft_steps=3, ft_avg_every=3)
KEYS = {*MATRIX_KEYS, "task_agnostic_acc", "oracle_acc", "routing_accuracy"}


@pytest.fixture(scope="module")
def seq():
    return [load_builtin(d, n_train=10, n_test=4) for d in ("shapes", "colours", "digits")]


@pytest.fixture(scope="module")
def report(seq, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_benchmark(seq, BenchSettings(**FAST), out=out)


def test_report_layout_and_files(seq, report):
    out, res = report
    T = len(seq)
    assert res["tasks"] == [t.name for t in seq]
    assert KEYS <= set(res["metrics"]) and len(res["acc_matrix"]) == T
    assert set(res["baselines"]) == {"zoo-oracle", *METHODS} and "slda" in METHODS
    assert res["schema_version"] == 4 and "avg" not in res["metrics"]
    zs = res["baselines"]["zero-shot"]["acc_matrix"]
    for name, b in res["baselines"].items():
        assert KEYS <= set(b), name
        assert len(b["acc_matrix"]) == T and all(len(r) == T for r in b["acc_matrix"])
    R = res["baselines"]["slda"]["acc_matrix"]  # no statistics for an unseen task: zero-shot CLIP there
    assert all(R[i][j] == zs[i][j] for i in range(T) for j in range(i + 1, T))
    for j in range(T):  # more competing classes can only turn zero-shot's right answers wrong
        assert all(zs[i + 1][j] <= zs[i][j] for i in range(j, T - 1)), zs
    assert json.loads((out / "report.json").read_text())["acc_matrix"] == res["acc_matrix"]
    for f in ("report.md", "acc_matrix.png", "acc_curves.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| zoo (routed) | no |" in md and "| adapter-joint (shared adapter retrained on all seen data) | no |" in md
    assert "upper bound" not in md.replace("routing upper bound", "")
    assert "avg (MTIL)" in md and "avg inc" in md and "Chaudhry et al., 2018" in md
    t = res["settings"]["tuning"]
    assert t["tuned"] and t["on"] == [s.name for s in seq[:2]] and "chosen on validation data" in md
    for key, value in t["chosen"].items():
        assert value in t["grids"][key] and res["settings"][key] == value
        assert t["scores"][key][t["grids"][key].index(value)] == max(t["scores"][key])
    assert res["ood"] == {"holdout": None, "available": False, "reason": "no --holdout domain given"}


def test_zoo_never_changes_old_experts(report):
    """With task ids given, the zoo's accuracy on a task is fixed once it is learned: zero forgetting."""
    R = report[1]["baselines"]["zoo-oracle"]["acc_matrix"]
    for j in range(len(R)):
        assert len({R[i][j] for i in range(j, len(R))}) == 1
    assert report[1]["baselines"]["zoo-oracle"]["forgetting"] == 0.0


def test_costs_are_counted(seq, report):
    b = report[1]["baselines"]
    assert b["zero-shot"]["trainable_params"] == 0 == b["zero-shot"]["stored_params"]
    assert b["adapter-ewc"]["stored_params"] == 3 * b["adapter-naive"]["stored_params"]  # model, Fisher, anchor
    assert b["adapter-lwf"]["stored_params"] == 2 * b["adapter-naive"]["stored_params"]
    assert b["adapter-joint"]["stored_images"] == sum(len(t.train) for t in seq)
    C, D = sum(len(t.classes) for t in seq), 128  # slda: class means and counts, one D x D covariance
    assert b["slda"]["trainable_params"] == 0 and b["slda"]["stored_images"] == 0
    assert b["slda"]["stored_params"] == C * D + C + D * D
    assert report[1]["metrics"]["stored_params"] > report[1]["metrics"]["trainable_params"] > 0
    assert report[1]["memory"]["peak_rss_mb"] > 0


def test_state_restore_round_trip(seq):
    """A restored method predicts exactly like the one that learned (what resume relies on)."""
    embs = [torch.nn.functional.normalize(torch.randn(len(t.classes), 8), dim=-1) for t in seq]
    data = [(torch.nn.functional.normalize(torch.randn(20, 8), dim=-1), torch.randint(0, len(t.classes), (20,)))
            for t in seq[:2]]
    from clipzoo.zoo.train import TrainSettings

    for cls in (baselines.NaiveSequential, baselines.EWC, baselines.LwF, baselines.Joint):
        a, b = cls(embs, 10.0, TrainSettings(epochs=2)), cls(embs, 10.0, TrainSettings(epochs=2))
        for t, (x, y) in enumerate(data):
            a.learn(t, x, y)
        b.restore(a.state(), data)
        x = torch.randn(5, 8)
        assert torch.equal(a.agnostic(x, [0, 1])[1], b.agnostic(x, [0, 1])[1]), cls.name
        for m in (a, b):  # the harness seeds every step the same way (joint draws a fresh model)
            torch.manual_seed(1)
            m.learn(2, *data[0])
        assert torch.equal(a.model(x), b.model(x)), cls.name
    a, b = SLDA(embs, 10.0), SLDA(embs, 10.0)
    for t, (x, y) in enumerate(data):
        a.learn(t, x, y)
    b.restore(a.state(), data)
    x = torch.randn(5, 8)
    assert all(torch.equal(u, v) for u, v in zip(a.agnostic(x, [0, 1]), b.agnostic(x, [0, 1])))


def test_slda_from_per_task_statistics_equals_lda_on_the_pooled_data():
    """Adding tasks' statistics gives exactly the LDA fitted on all seen data at once (no task ids)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g) + 2 * torch.randn(1, 6, generator=g) for _ in range(2)]
    ys = [torch.arange(40) % 3, torch.arange(40) % 2]
    m = SLDA([torch.zeros(3, 6), torch.zeros(2, 6)], 1.0, shrinkage=0.1)
    for t in range(2):
        m.learn(t, xs[t], ys[t])
    x, y = torch.cat(xs).double(), torch.cat([ys[0], ys[1] + 3])
    mu = torch.stack([x[y == c].mean(0) for c in range(5)])
    cov = (x - mu[y]).T @ (x - mu[y]) / len(y)
    cov = 0.9 * cov + 0.1 * torch.trace(cov) / 6 * torch.eye(6, dtype=cov.dtype)
    w = torch.linalg.solve(cov, mu.T).T
    flat = (x @ w.T - 0.5 * (w * mu).sum(1)).argmax(1)
    task, cls = m.agnostic(torch.cat(xs), [0, 1])
    assert torch.equal(task, (flat >= 3).long()) and torch.equal(cls, torch.where(flat >= 3, flat - 3, flat))
    assert torch.equal(m.given(xs[1], 1), (x[40:] @ w[3:].T - 0.5 * (w[3:] * mu[3:]).sum(1)).argmax(1))


def test_validation_split_is_stratified_fixed_and_disjoint(seq):
    task = load_builtin("shapes", n_train=20, n_test=4)
    tr, va = validation_split(task, fraction=0.1, seed=0)
    C = len(task.classes)
    assert [len(task.train), len(tr.train), len(va.test)] == [20 * C, 18 * C, 2 * C]  # 10% of 20, per class
    assert sorted(va.test.labels) == sorted(list(range(C)) * 2)
    assert tr.test is task.test and va.train is tr.train
    ids = lambda s: {id(i) for i in s.images}  # noqa: E731
    assert not ids(tr.train) & ids(va.test) and ids(tr.train) | ids(va.test) == ids(task.train)
    assert va.test.images == validation_split(task, 0.1, 0)[1].test.images
    assert va.test.images != validation_split(task, 0.1, 1)[1].test.images
    with pytest.raises(ConfigError, match="fraction"):
        validation_split(task, fraction=1.0)


def test_tuning_never_reads_test_features():
    """The choice depends on the training splits only: scrambled test features change nothing."""
    g = torch.Generator().manual_seed(0)
    embs = [torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1) for _ in range(2)]
    feats = [(torch.nn.functional.normalize(torch.randn(60, 8, generator=g) + embs[t][torch.arange(60) % 3], dim=-1),
              torch.arange(60) % 3, torch.randn(9, 8), torch.zeros(9, dtype=torch.long)) for t in range(2)]
    from clipzoo.zoo.train import TrainSettings

    def build(method, key, value):
        kw = {"lam": value} if method == "adapter-ewc" else {"shrinkage": value}
        return (baselines.EWC(embs, 10.0, TrainSettings(epochs=2), **kw) if method == "adapter-ewc"
                else SLDA(embs, 10.0, **kw))

    a = tuning.choose(build, ["adapter-ewc", "slda", "adapter-naive"], feats, ["a", "b"], 0.2, 0, 0)
    scrambled = [(x, y, torch.randn(9, 8), torch.ones(9, dtype=torch.long)) for x, y, _, _ in feats]
    b = tuning.choose(build, ["adapter-ewc", "slda", "adapter-naive"], scrambled, ["a", "b"], 0.2, 0, 0)
    assert a["chosen"] == b["chosen"] and a["scores"] == b["scores"] and set(a["chosen"]) == {"ewc_lambda",
                                                                                              "slda_shrinkage"}
    assert a["val_sizes"] == [[48, 12], [48, 12]]


def test_resume_after_a_crash_reuses_finished_steps(seq, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    settings = BenchSettings(**FAST, methods=["slda", "adapter-ewc", "adapter-joint"])  # the fine-tuning
    clean = run_benchmark(seq, settings)  # baselines' state round trip: tests/test_finetune.py
    real = baselines.Joint.learn

    def crash(self, t, x, y):
        if t == 2:
            raise RuntimeError("simulated crash")
        return real(self, t, x, y)

    monkeypatch.setattr(baselines.Joint, "learn", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        run_benchmark(seq, settings, out=out)
    assert (out / "zoo" / "experts" / seq[2].name).is_dir()  # trained by the crashed step
    monkeypatch.setattr(baselines.Joint, "learn", real)
    res = run_benchmark(seq, settings, out=out, resume=True)
    assert res["runs"][0]["resumed_from_step"] == 2
    assert res["acc_matrix"] == clean["acc_matrix"]
    for name in clean["baselines"]:
        assert res["baselines"][name]["acc_matrix"] == clean["baselines"][name]["acc_matrix"], name
    with pytest.raises(ConfigError, match="cannot resume"):
        run_benchmark(seq, replace(settings, epochs=3), out=out, resume=True)


def test_orders_and_seeds_aggregate(seq):
    res = run_benchmark(seq[:2], BenchSettings(epochs=1, orders=2, seeds=2, methods=["adapter-naive"]))
    assert [(r["order"], r["seed"]) for r in res["runs"]] == [
        (["shapes", "colours"], 0), (["shapes", "colours"], 1), (["colours", "shapes"], 0), (["colours", "shapes"], 1)]
    agg = res["aggregate"]["adapter-naive"]["forgetting"]
    vals = [r["methods"]["adapter-naive"]["forgetting"] for r in res["runs"]]
    assert agg["n"] == 4 and agg["mean"] == pytest.approx(sum(vals) / 4, abs=1e-6)
    assert set(res["baselines"]) == {"zoo-oracle", "adapter-naive"}


def test_task_orders():
    o = task_orders(4, 5, seed=3)
    assert o[0] == [0, 1, 2, 3] and len({tuple(p) for p in o}) == 5
    assert all(sorted(p) == [0, 1, 2, 3] for p in o)
    assert o == task_orders(4, 5, seed=3) and o != task_orders(4, 5, seed=4)
    with pytest.raises(ConfigError, match="only 2 orders"):
        task_orders(2, 3, seed=0)


def test_sequence_folder_holdout_and_cli(tmp_path):
    root = tmp_path / "data"
    for d in ("shapes", "colours", "textures"):
        write_imagefolder(load_builtin(d, n_train=6, n_test=3), root / d)
    assert [p.name for p in expand_domains([str(root)])] == ["colours", "shapes", "textures"]
    rest, held = split_holdout(load_sequence([str(root)]), "textures")
    assert [t.name for t in rest] == ["colours", "shapes"] and held.name == "textures"
    r = CliRunner().invoke(main, ["bench", str(root), "--holdout", "textures", "--epochs", "1", "--methods",
                                  "adapter-naive,adapter-ewc", "--out", str(tmp_path / "out"), "--json", "--no-tune",
                                  "--val-fraction", "0.2"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["settings"]["tuning"]["tuned"] is False and res["settings"]["val_fraction"] == 0.2
    assert res["tasks"] == ["colours", "shapes"] and res["ood"]["holdout"] == "textures"
    if res["ood"]["available"]:  # every held-out image is either routed to an expert or falls back
        assert sum(res["ood"]["routed_to"].values()) + res["ood"]["fallback_rate"] == pytest.approx(1, abs=1e-5)
        known = sum(t["n_test"] for t in res["per_task"].values())  # a share of whole known test images
        assert res["ood"]["false_fallback_rate"] * known == pytest.approx(round(res["ood"]["false_fallback_rate"] * known), abs=1e-3)
    else:
        assert "fallback" in res["ood"]["reason"]
    bad = CliRunner().invoke(main, ["bench", str(root), "--methods", "magic", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "error: unknown method(s) magic" in bad.output


def test_avalanche_cross_check_rows(seq):
    pytest.importorskip("avalanche")
    from clipzoo.bench.avalanche_check import AvalancheStrategy
    from clipzoo.zoo.train import TrainSettings

    res = run_benchmark(seq[:2], BenchSettings(epochs=1, methods=["adapter-naive", "avalanche-naive", "avalanche-ewc"]))
    for n in ("avalanche-naive", "avalanche-ewc"):
        assert res["baselines"][n]["cross_check"] and len(res["baselines"][n]["acc_matrix"]) == 2
    assert res["baselines"]["avalanche-ewc"]["stored_params"] > res["baselines"]["avalanche-naive"]["stored_params"]
    # resume replays the finished tasks (each seeded): the same model comes back
    embs = [torch.nn.functional.normalize(torch.randn(3, 8), dim=-1) for _ in range(2)]
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]

    def fresh():  # the harness seeds before building its methods
        torch.manual_seed(0)
        return AvalancheStrategy("lwf", embs, 10.0, TrainSettings(epochs=2), 100.0, 1.0)

    a, b = fresh(), fresh()
    for t, (x, y) in enumerate(data):
        a.learn(t, x, y)
    b.restore({}, data)
    assert torch.equal(a.model(data[0][0]), b.model(data[0][0]))


def test_zoo_transfer_goes_through_routing(seq, report):
    """The zoo's upper triangle is its real answer to an unlearned task's images given their class
    names: an image the router sends to a known expert is wrong, a fallback is zero-shot CLIP."""
    from clipzoo.bench.harness import _zoo_unseen
    from clipzoo.zoo.zoo import Zoo

    out, _ = report
    zoo = Zoo.open(out / "zoo")
    t = load_builtin("textures", n_train=4, n_test=12)  # never added to this zoo
    x, y = zoo.features(t.test.images), torch.tensor(t.test.labels)
    preds = zoo.predict_features(x, classes=t.classes)
    got = _zoo_unseen(zoo, x, t.classes, y)
    fell = torch.tensor([p["fallback"] for p in preds])
    assert not got[~fell].any()
    assert got[fell].tolist() == [p["label"] == t.classes[int(c)] for p, c, f in zip(preds, y, fell) if f]
