"""AdapterFusion: the layer, composed experts (add-task --kind fusion), the three prediction modes,
the global fusion's cache, removal of a composed expert's sources, the CLI and the benchmark."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot
from clipzoo.router.fusion import AdapterFusion, FusionSettings
from clipzoo.zoo.experts.fusion import BASE, FusionExpert
from clipzoo.tasks.data import write_imagefolder
from clipzoo.bench.fusion import few_shot
from clipzoo.tasks.spec import Split
from clipzoo.zoo import registry
from clipzoo.runtime import cache_root
from clipzoo.cli import main
from clipzoo.errors import ConfigError, IntegrityError, RegistryError
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

SMALL = FusionSettings(n_pseudo=600, epochs=15, batch_size=200)
FAST = TrainSettings(epochs=4, batch_size=32)


@pytest.fixture(scope="module")
def base_zoo(tmp_path_factory, builtin_tasks):
    """shapes, colours, textures experts and 'digits' composed from shapes + colours."""
    z = Zoo.create(tmp_path_factory.mktemp("fz") / "zoo")
    for d in ("shapes", "colours", "textures"):
        z.add_task(builtin_tasks[d], train=FAST)
    z.add_task(builtin_tasks["digits"], kind="fusion", sources=["shapes", "colours"], train=FAST)
    return z


@pytest.fixture
def zoo_copy(base_zoo, tmp_path):
    shutil.copytree(base_zoo.root, tmp_path / "zoo")
    z = Zoo.open(tmp_path / "zoo")
    z.fusion_settings = SMALL
    return z


def test_fusion_layer_weights_are_a_distribution_and_values_start_as_identity():
    torch.manual_seed(0)
    layer = AdapterFusion(16, seed=1)
    f, h = torch.randn(5, 16), torch.randn(5, 3, 16)
    z, a = layer(f, h)
    assert a.shape == (5, 3) and torch.allclose(a.sum(1), torch.ones(5)) and (a > 0).all()
    assert torch.allclose(z.norm(dim=1), torch.ones(5))
    z1, a1 = layer(f, h[:, :1])  # one candidate: its own feature, normalised (Wv = I at init)
    assert torch.allclose(a1, torch.ones(5, 1)) and torch.allclose(z1, torch.nn.functional.normalize(h[:, 0], dim=1))
    _, a2 = layer(f, h, bias=torch.tensor([[0.0, 50.0, 0.0]]).expand(5, 3))
    assert (a2[:, 1] > 0.99).all()


def test_adapted_features_and_class_weights_reproduce_forward(base_zoo, builtin_tasks):
    x = base_zoo.features(builtin_tasks["shapes"].test.images)
    for name in ("shapes", "digits"):
        exp = base_zoo.expert(name)
        with torch.no_grad():
            ref = exp.logit_scale * exp.adapted_features(x) @ exp.class_weights().T
            assert torch.allclose(exp(x), ref, atol=1e-5)


def test_compose_records_sources_and_never_touches_them(zoo_copy, builtin_tasks):
    z = zoo_copy
    before = {n: snapshot(z.expert_dir(n)) for n in ("shapes", "colours", "textures")}
    rec = z.add_task(builtin_tasks["digits"], name="digits2", kind="fusion", sources=["textures", "shapes"],
                     train=FAST)
    assert {n: snapshot(z.expert_dir(n)) for n in before} == before
    assert rec["kind"] == "fusion" and rec["sources"] == ["textures", "shapes"]
    assert set(rec["files"]) == {"config.json", "weights.safetensors", "stats.safetensors"}
    exp = z.expert("digits2")
    assert exp.candidates == ["textures", "shapes", BASE]
    d = z.backbone.embed_dim
    assert rec["trainable_params"] == 3 * d * d + len(rec["classes"]) * d == exp.trainable_params()
    assert "digits2" in z.router().names and z.verify()["ok"]
    registry.validate(json.loads((z.root / "registry.json").read_text()))
    # trained: the fusion layer moved away from its initialisation
    fresh = FusionExpert({}, exp.classes, exp.templates, exp.class_emb, exp.logit_scale, exp.fingerprint)
    assert not torch.equal(exp.fusion.value.weight, fresh.fusion.value.weight)


def test_compose_refuses_bad_requests(zoo_copy, builtin_tasks):
    with pytest.raises(RegistryError, match="nope"):
        zoo_copy.add_task(builtin_tasks["digits"], name="d3", kind="fusion", sources=["nope"], train=FAST)
    with pytest.raises(ConfigError, match="--kind fusion"):
        zoo_copy.add_task(builtin_tasks["digits"], name="d3", sources=["shapes"], train=FAST)
    with pytest.raises(ConfigError, match="include_base"):
        zoo_copy.add_task(builtin_tasks["digits"], name="d3", kind="fusion", settings={"fusion": {"rank": 2}},
                          train=FAST)
    assert "d3" not in Zoo.open(zoo_copy.root).names


def test_composed_expert_round_trip_gives_identical_outputs(base_zoo, builtin_tasks):
    x = base_zoo.features(builtin_tasks["digits"].test.images)
    before = base_zoo.expert("digits")
    again = Zoo.open(base_zoo.root).expert("digits")
    assert again is not before
    with torch.no_grad():
        assert torch.equal(before(x), again(x))
    assert before.fusion_weights(x) == again.fusion_weights(x)
    w = again.fusion_weights(x)[0]
    assert set(w) == {"shapes", "colours", BASE} and abs(sum(w.values()) - 1) < 1e-4


def test_a_changed_source_is_refused(zoo_copy):
    reg = registry.read(zoo_copy.root)
    reg["experts"]["shapes"]["sha256"] = "0" * 64
    registry.write(zoo_copy.root, reg)
    with pytest.raises(IntegrityError, match="shapes"):
        Zoo.open(zoo_copy.root).expert("digits")


def test_removing_a_source_is_refused_or_cascades(zoo_copy):
    with pytest.raises(RegistryError, match="digits.*--cascade"):
        zoo_copy.remove("colours")
    assert "colours" in Zoo.open(zoo_copy.root).names
    zoo_copy.remove("textures")  # not a source: removed as usual
    zoo_copy.remove("colours", cascade=True)
    z = Zoo.open(zoo_copy.root)
    assert z.names == ["shapes"] and not z.expert_dir("digits").exists() and z.verify()["ok"]


def _fusion_preds(z, tasks, k=2):
    """Fusion-mode answers per task, the task-agnostic accuracy and the mean weight on the true
    task where the router offered it."""
    preds = {t.name: z.predict_features(z.features(t.test.images), top_k=k, mode="fusion")
             for t in tasks}
    ok = [p["task"] == t.name and p["label"] == t.classes[y] for t in tasks for p, y in zip(preds[t.name], t.test.labels)]
    on_true = [p["fusion"][t.name] for t in tasks for p in preds[t.name] if t.name in p["fusion"]]
    return preds, sum(ok) / len(ok), sum(on_true) / len(on_true)


def test_three_modes_answer_in_the_same_format(zoo_copy, builtin_tasks):
    x = zoo_copy.features(builtin_tasks["textures"].test.images)
    outs = {m: zoo_copy.predict_features(x, top_k=2, mode=m) for m in ("top1", "avg", "fusion")}
    for m, preds in outs.items():
        for p in preds:
            assert p["task"] is None or p["label"] in zoo_copy.record(p["task"])["classes"]
            assert 0 <= p["score"] <= 1 and (p["task"] is None or p["task"] in p["routing"] or m == "top1")
    for p in outs["fusion"]:
        assert set(p["fusion"]) == set(p["routing"]) and abs(sum(p["fusion"].values()) - 1) < 1e-4
    for p in outs["avg"] + outs["fusion"]:  # same keys as top-1 answers, zero-shot fallback included
        assert set(outs["top1"][0]) - {"fusion"} <= set(p) and p["fallback"] is (p["task"] is None)
    assert all("fusion" not in p for p in outs["avg"] + outs["top1"])
    given = zoo_copy.predict_features(x, task="textures", mode="fusion")
    assert all(p["task"] == "textures" for p in given)
    with pytest.raises(ConfigError, match="top-k 2"):
        zoo_copy.predict_features(x, top_k=1, mode="fusion")
    with pytest.raises(ConfigError, match="unknown prediction mode"):
        zoo_copy.predict_fused(x, top_k=2, mode="vote")


def test_avg_mode_is_the_uniform_mixture_of_the_top_k(zoo_copy, builtin_tasks):
    x = zoo_copy.features(builtin_tasks["shapes"].test.images[:6])
    r = zoo_copy.route(x, 2)
    preds = zoo_copy.predict_features(x, top_k=2, mode="avg")
    for b, p in enumerate(preds):
        best = max(((0.5 * float(pr), r.names[int(e)], zoo_copy.expert(r.names[int(e)]).classes[c])
                    for e in r.indices[b]
                    for c, pr in enumerate(zoo_copy.expert(r.names[int(e)])(x[b:b + 1]).softmax(1)[0].detach())))
        assert (p["task"], p["label"]) == best[1:] and abs(p["score"] - best[0]) < 1e-5


def test_global_fusion_learns_from_stats_is_cached_and_never_writes_the_zoo(zoo_copy, builtin_tasks):
    z = zoo_copy
    z.remove("digits", cascade=True)
    before = snapshot(z.root)
    tasks = [builtin_tasks[d] for d in ("shapes", "colours", "textures")]
    preds, acc, on_true = _fusion_preds(z, tasks)
    assert snapshot(z.root) == before
    assert list(cache_root().joinpath("fusion").glob("*.safetensors"))
    assert z.fusion_info["cached"] is False and z.fusion_info["n_used"] > 0
    assert on_true > 0.5  # weight on the true task, where the router offered it, beats uniform 1/k
    again = Zoo.open(z.root)
    again.fusion_settings = SMALL
    assert _fusion_preds(again, tasks)[0] == preds and again.fusion_info["cached"] is True
    assert z.fusion_ks() == [2]
    rec = z.add_task(builtin_tasks["digits"], train=FAST)  # new expert: its fusion is trained at add time
    m = rec["metrics"]
    assert m["fusion_seconds"] > 0 and m["add_seconds"] >= m["fusion_seconds"] + m["router_seconds"]
    assert z.registry["experts"]["digits"]["metrics"] == m
    fresh = Zoo.open(z.root)
    fresh.fusion_settings = SMALL
    fresh.predict_features(z.features(tasks[0].test.images[:4]), top_k=2, mode="fusion")
    assert fresh.fusion_info["cached"] is True  # the first predict after the add trains nothing


def test_fusion_is_ready_after_an_add_from_the_cli(zoo_copy, builtin_tasks, tmp_path):
    """``predict --mode fusion`` after ``add-task`` (fresh processes, default settings) finds its fusion trained."""
    z = zoo_copy
    z.remove("digits", cascade=True)
    z.predict_features(z.features(builtin_tasks["shapes"].test.images[:2]), top_k=2, mode="fusion")
    folder = tmp_path / "digits"
    write_imagefolder(builtin_tasks["digits"], folder)
    res = CliRunner().invoke(main, ["add-task", "--zoo", str(z.root), "--name", "digits2", "--data", str(folder),
                                    "--epochs", "2"])
    assert res.exit_code == 0, res.output
    metrics = registry.read(z.root)["experts"]["digits2"]["metrics"]
    assert metrics["fusion_seconds"] > 0 and metrics["router_seconds"] >= 0
    fresh = Zoo.open(z.root)
    fresh.predict_features(fresh.features(builtin_tasks["shapes"].test.images[:2]), top_k=2, mode="fusion")
    assert fresh.fusion_info == {"cached": True}
    # a zoo that never used fusion mode pays nothing for it at add time
    plain = Zoo.create(tmp_path / "plain")
    for d in ("shapes", "colours"):
        assert "fusion_seconds" not in plain.add_task(builtin_tasks[d], train=FAST)["metrics"]


def test_predict_of_a_composed_expert_reports_its_source_weights(base_zoo, builtin_tasks):
    preds = base_zoo.predict(builtin_tasks["digits"].test.images[:3], task="digits")
    assert all(set(p["sources"]) == {"shapes", "colours", BASE} for p in preds)


def test_cli_compose_predict_fusion_and_cascade(zoo_copy, builtin_tasks, tmp_path, monkeypatch):
    monkeypatch.setattr(Zoo, "fusion_settings", SMALL)
    run = CliRunner().invoke
    small = few_shot(builtin_tasks["digits"], 2, 0, "digits")
    small.test = Split(small.train.images, small.train.labels)
    data = write_imagefolder(small, tmp_path / "digits")
    zd = str(zoo_copy.root)
    r = run(main, ["add-task", "--zoo", zd, "--name", "d2", "--data", str(data), "--kind", "fusion",
                   "--from", "shapes,textures", "--epochs", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sources"] == ["shapes", "textures"]
    r = run(main, ["predict", "--zoo", zd, "--mode", "fusion", "--top-k", "2", "--json",
                   str(data / "test" / "zero")])
    assert r.exit_code == 0, r.output
    preds = json.loads(r.output)
    assert preds and all(abs(sum(p["fusion"].values()) - 1) < 1e-4 for p in preds)
    r = run(main, ["remove", "--zoo", zd, "--name", "shapes"])
    assert r.exit_code == 1 and "error:" in r.output and "--cascade" in r.output
    r = run(main, ["remove", "--zoo", zd, "--name", "shapes", "--cascade", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.output)["cascaded"]) == ["d2", "digits"]
    assert Zoo.open(zd).names == ["colours", "textures"]


def test_few_shot_draws_k_per_class_deterministically(builtin_tasks):
    t = builtin_tasks["shapes"]
    a, b = few_shot(t, 3, 0, "s3"), few_shot(t, 3, 0, "s3")
    assert a.train.images == b.train.images and len(a.test) == len(t.test)
    assert sorted(a.train.labels) == sorted(list(range(len(t.classes))) * 3)
    assert few_shot(t, None, 0, "all").train.labels == t.train.labels


def _bench_tasks():
    from clipzoo.tasks.data import load_builtin

    return [load_builtin(d, n_train=6, n_test=3) for d in ("shapes", "colours")], load_builtin("textures", 4, 2)


def _figures(run: dict) -> dict:
    """A per-seed record less its timings (and how the zoo-wide fusion was obtained: trained or cached)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("ms_per_image", "add_seconds")}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return strip({k: v for k, v in run.items() if k not in ("timing", "global_fusion")})


def test_bench_is_seeded_scores_modes_on_validation_and_summarises_seeds(tmp_path, monkeypatch):
    import statistics

    from clipzoo.bench.fusion import FusionBenchSettings, run_fusion_bench

    monkeypatch.setattr(Zoo, "fusion_settings", FusionSettings(n_pseudo=200, epochs=3, batch_size=200))
    tasks, new = _bench_tasks()
    s = FusionBenchSettings(shots=[2], epochs=1, seed=3, seeds=2, val_fraction=0.34)
    two = run_fusion_bench(tasks, new, s, out=tmp_path / "two")
    one = run_fusion_bench(tasks, new, FusionBenchSettings(shots=[2], epochs=1, seed=3, val_fraction=0.34), out=None)
    assert two["seeds"] == [3, 4] and one["seeds"] == [3] and [r["seed"] for r in two["per_seed"]] == [3, 4]
    assert _figures(two["per_seed"][0]) == _figures(one["per_seed"][0])  # the same seed, the same figures
    # the modes on the carved validation split and on test; the choice is made on validation
    assert two["validation"] == {"fraction": 0.34, "seed": 0, "n_val": {"shapes": 10, "colours": 12},
                                 "split": two["validation"]["split"]}
    ch = two["choice"]
    assert ch["criterion"] == "validation" and {c["mode"] for c in ch["candidates"]} == {"top1", "avg", "fusion"}
    val = two["summary"]["task_agnostic"]["val"]
    best = max(v["accuracy"]["mean"] for m, v in val.items() if m != "oracle")
    chosen = ch["chosen_on_validation"]
    assert chosen["val_accuracy"] == best == val[chosen["mode"]]["accuracy"]["mean"]
    for run in two["per_seed"]:
        assert set(run["task_agnostic"]) == {"val", "test"} and run["chosen_on_validation"]["mode"] in val
    # mean and std of every figure over the seeds
    for split in ("val", "test"):
        for mode, fig in two["summary"]["task_agnostic"][split].items():
            vals = [r["task_agnostic"][split][mode]["accuracy"] for r in two["per_seed"]]
            assert fig["accuracy"] == {"mean": round(statistics.mean(vals), 6), "std": round(statistics.stdev(vals), 6)}
            assert fig["task_ids"] in ("given", "routed") and set(fig["per_task"]["shapes"]) == {"mean", "std"}
    (few,) = two["summary"]["few_shot"]
    assert few["shots"] == 2 and set(few["fusion"]["test_acc"]) == {"mean", "std"}
    assert one["summary"]["few_shot"][0]["clip-adapter"]["test_acc"]["std"] == 0.0
    on_disk = json.loads((tmp_path / "two" / "report.json").read_text())
    assert on_disk["choice"]["criterion"] == "validation" and len(on_disk["per_seed"]) == 2
    md = (tmp_path / "two" / "report.md").read_text()
    assert "| val accuracy | test accuracy |" in md and " ± " in md and "Chosen on validation" in md
    # the zoo learnt from the training split less the validation split
    zoo = Zoo.open(tmp_path / "two" / "zoo")
    assert len(tasks[0].train) == 30 and zoo.record("shapes")["training"]["n_train"] == 20


def test_report_tables_and_plot(tmp_path):
    from clipzoo.bench.fusion import markdown_tables, write_fusion_report

    names = ["a", "b"]

    def ms(v):
        return {"mean": v, "std": 0.01}

    mode = {"accuracy": ms(0.5), "task_accuracy": ms(0.75), "per_task": {"a": ms(0.4), "b": ms(0.6)},
            "task_ids": "routed", "ms_per_image": ms(0.1)}
    few = {"shots": 4, "zero_shot_acc": ms(0.1), "no-source ablation": {"test_acc": ms(0.2)},
           "fusion": {"test_acc": ms(0.3), "trainable_params": ms(10)},
           "clip-adapter": {"test_acc": ms(0.25), "trainable_params": ms(5)}}
    modes = {m: mode for m in ("oracle", "top1", "avg", "fusion")}
    res = {"domains": names, "new_task": "n", "settings": {"top_k": 2}, "seeds": [0, 1],
           "validation": {"fraction": 0.1},
           "summary": {"task_agnostic": {"val": modes, "test": modes}, "few_shot": [few]},
           "choice": {"criterion": "validation",
                      "chosen_on_validation": {"mode": "fusion", "top_k": 2, "val_accuracy": 0.5,
                                               "test_accuracy": 0.5}},
           "fusion_weights": {"tasks": names, "experts": names, "mean": [[0.9, 0.1], [0.2, 0.8]]},
           "composed_source_weights": {"4shot": {"a": 0.5, "b": 0.3, BASE: 0.2}}}
    text = markdown_tables(res)
    assert ("| top-2 AdapterFusion | routed | 0.500 ± 0.010 | 0.500 ± 0.010 | 0.750 ± 0.010 | 0.400 ± 0.010 | "
            "0.600 ± 0.010 |") in text
    assert "| 4 | 0.300 ± 0.010 | 0.250 ± 0.010 | 0.200 ± 0.010 | 0.100 ± 0.010 | 10 | 5 |" in text
    assert "Chosen on validation: top-2 AdapterFusion (val 0.500, test 0.500)." in text
    write_fusion_report(res, tmp_path)
    assert (tmp_path / "fusion_weights.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["new_task"] == "n"


def test_composed_attention_prefers_the_source_trained_on_the_same_domain(zoo_copy, builtin_tasks):
    t = builtin_tasks["shapes"]
    longer = TrainSettings(epochs=20, batch_size=32, lr=1e-2)
    zoo_copy.add_task(t, name="shapes-long", train=longer)
    zoo_copy.add_task(t, name="shapes2", kind="fusion", sources=["colours", "shapes-long", "textures"],
                      settings={"fusion": {"include_base": False}}, train=longer)
    w = zoo_copy.expert("shapes2").fusion_weights(zoo_copy.features(t.test.images))
    mean = {n: sum(x[n] for x in w) / len(w) for n in w[0]}
    assert BASE not in mean and mean["shapes-long"] > max(mean["colours"], mean["textures"]) + 0.05, mean


def test_cascade_removes_a_diamond_of_fusion_experts_once(zoo_copy, builtin_tasks):
    """y composes shapes and digits, digits composes shapes: removing shapes removes both, once."""
    z = zoo_copy
    z.add_task(builtin_tasks["textures"], name="y", kind="fusion", sources=["shapes", "digits"], train=FAST)
    removed = z.remove("shapes", cascade=True)
    assert sorted(removed[:-1]) == ["digits", "y"] and removed[-1] == "shapes"
    assert z.names == ["colours", "textures"] and z.verify()["ok"]
