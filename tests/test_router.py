"""The learned sparse router, the calibrated OOD fallback and their place in the zoo."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from clipzoo.bench.router import _synthetic_stats, sequence_bench, RouterBenchSettings
from clipzoo.router.gate import NearestStatsRouter
from clipzoo.router.groups import Groups
from clipzoo.router.learned import RouterConfig, SparseRouter, balance_loss
from clipzoo.router.ood import QUANTILES, detector_from_stats
from clipzoo.router.stats import TaskStats, compute_stats
from conftest import snapshot
from clipzoo.zoo import registry
from clipzoo.errors import ConfigError, RegistryError
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo
from clipzoo.cli import main

DIM = 64


def _task(seed: int, n_per_class: int = 40, classes: int = 5, spread: float = 0.6):
    """Features of a synthetic task: class clusters around a random centre on the unit sphere."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(DIM, generator=g), dim=0) + spread * F.normalize(
        torch.randn(classes, DIM, generator=g), dim=1)
    y = torch.arange(classes).repeat(n_per_class)
    x = F.normalize(means[y] + 0.5 / DIM ** 0.5 * torch.randn(len(y), DIM, generator=g), dim=1)
    return x, y, means


def _sample(means: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(len(means), (n,), generator=g)
    return F.normalize(means[y] + 0.5 / DIM ** 0.5 * torch.randn(n, DIM, generator=g), dim=1)


@pytest.fixture(scope="module")
def synth():
    """Four synthetic tasks: (stats, fresh test features) each."""
    out = {}
    for i in range(4):
        x, y, means = _task(i)
        out[f"t{i}"] = (compute_stats(x, y, len(means)), _sample(means, 100, 100 + i))
    return out


def test_stats_carry_ood_calibration_and_round_trip(tmp_path):
    x, y, means = _task(0)
    s = compute_stats(x, y, len(means))
    assert s.ood_quantiles.shape == QUANTILES.shape
    assert bool((s.ood_quantiles.diff() >= 0).all()) and float(s.ood_quantiles[0]) > 0
    s.save(tmp_path)
    back = TaskStats.load(tmp_path)
    assert all(torch.equal(getattr(back, k), getattr(s, k).double()) for k in s.__dict__)
    from safetensors.torch import save_file

    save_file({k: v for k, v in back.__dict__.items() if k != "ood_quantiles"}, str(tmp_path / "stats.safetensors"))
    with pytest.raises(RegistryError, match="ood_quantiles"):
        TaskStats.load(tmp_path)


def test_ood_threshold_is_calibrated_on_held_out_data(synth):
    det = detector_from_stats([s for s, _ in synth.values()], q=0.95)
    known = torch.cat([t for _, t in synth.values()])
    far = torch.cat([_sample(_task(50 + i)[2], 100, 7) for i in range(2)])   # tasks never learned
    assert float(det.is_ood(known).float().mean()) < 0.12        # about 1 - q, not more
    assert float(det.is_ood(far).float().mean()) > 0.9
    det.q = 0.5
    assert float(det.is_ood(known).float().mean()) > 0.2          # a lower quantile falls back more
    with pytest.raises(ConfigError):
        detector_from_stats([s for s, _ in synth.values()], q=1.5)


def test_sparse_router_learns_from_stats_and_keeps_old_tasks(synth):
    r = SparseRouter(DIM, RouterConfig(steps=200))
    accs = []
    for i, (name, (stats, _)) in enumerate(synth.items()):
        r.add(name, stats)
        x = torch.cat([synth[n][1] for n in r.names])
        y = torch.arange(len(r.names)).repeat_interleave(100)
        routing = r.route(x, k=2)
        accs.append(float((routing.indices[:, 0] == y).float().mean()))
        assert torch.allclose(routing.weights.sum(1), torch.ones(len(x)))
        assert routing.indices.shape == (len(x), min(2, i + 1))
    assert min(accs) > 0.95, accs
    assert routing.names == list(synth)


def test_router_file_round_trip_is_exact(synth, tmp_path):
    r = SparseRouter.from_stats({n: s for n, (s, _) in synth.items()}, RouterConfig(cold_steps=100))
    files = r.save(tmp_path, "router-v1")
    back = SparseRouter.load(tmp_path / files[0], tmp_path / files[1])
    x = torch.cat([t for _, t in synth.values()])
    assert torch.equal(back.scores(x), r.scores(x))
    assert torch.equal(back.route(x).ood_score, r.route(x).ood_score)
    assert back.names == r.names and back.config == r.config


def test_remove_drops_one_slot_and_keeps_the_others(synth):
    r = SparseRouter.from_stats({n: s for n, (s, _) in synth.items()}, RouterConfig(cold_steps=100))
    x = torch.cat([t for _, t in synth.values()])
    with torch.no_grad():
        before = r.logits(x)
    r.remove("t1")
    with torch.no_grad():
        after = r.logits(x)
    assert r.names == ["t0", "t2", "t3"]
    # the same rows of the same weights, read through a smaller matrix: equal up to float rounding
    torch.testing.assert_close(after, before[:, [0, 2, 3]], rtol=1e-5, atol=1e-5)
    with pytest.raises(RegistryError):
        r.remove("t1")


def test_update_works_on_a_fixed_pool_whatever_the_number_of_experts():
    """The cost of an update is set by pool size and steps, not by the number of experts."""
    tasks = _synthetic_stats(16, DIM, seed=1, per_class=12)
    r = SparseRouter(DIM, RouterConfig(steps=5, pool=1024, min_per_task=16))
    sizes = []
    for i, (stats, _) in enumerate(tasks):
        r.add(f"s{i}", stats)
        sizes.append(r.info.get("pool", 0))
    assert sizes[0] == 0 and max(sizes[1:]) <= 1024 + 16 and min(sizes[1:]) >= 1024 - 16


def test_router_update_steps_are_bounded_whatever_the_number_of_experts():
    """A warm update runs at most ``steps`` optimiser steps (fewer once the loss levels off), and
    its pool does not grow with the experts: the update's work is bounded."""
    tasks = _synthetic_stats(24, DIM, seed=2, per_class=12)
    cfg = RouterConfig(steps=80, min_steps=20, check_every=10, pool=1024, min_per_task=16)
    r = SparseRouter(DIM, cfg)
    steps = []
    for i, (stats, _) in enumerate(tasks):
        r.add(f"s{i}", stats)
        steps.append(r.info["steps"])
    assert steps[0] == 0 and all(1 <= s <= cfg.steps for s in steps[1:])
    assert all(s >= cfg.min_steps for s in steps[1:])


def _old_ood_scores(stats: list[TaskStats], det, feats: torch.Tensor) -> torch.Tensor:
    """The float64, one-task-at-a-time score of the previous implementation (the reference)."""
    from clipzoo.router.ood import class_mahalanobis

    per_task = [class_mahalanobis(feats, s.class_means.double(), torch.linalg.cholesky(s.class_cov.double())).min(1).values
                for s in stats]
    return (torch.stack(per_task, 1) + det.logdets[None]).min(1).values - det.threshold


def test_batched_float32_scoring_makes_the_same_decisions(synth):
    """The batched float32 OOD score and routing agree with the float64 per-task path on random data."""
    import math

    stats = [s for s, _ in synth.values()]
    det = detector_from_stats(stats)
    g = torch.Generator().manual_seed(7)
    feats = torch.cat([x for _, x in synth.values()] + [F.normalize(torch.randn(200, DIM, generator=g), dim=1)])
    old = _old_ood_scores(stats, det, feats)
    new = det.score(feats)
    assert new.dtype == torch.float32
    torch.testing.assert_close(new.double(), old, rtol=1e-4, atol=1e-3)
    assert torch.equal(new > 0, old > 0)
    # per-task distances and task choice (argmin of d_t + log det) match too
    ts = det.task_scores(feats)
    ref = torch.stack([torch.cdist(*(torch.linalg.solve_triangular(torch.linalg.cholesky(s.class_cov.double()), v.double().T,
                                                                   upper=False).T for v in (feats, s.class_means))).pow(2)
                       .min(1).values for s in stats], 1) + det.logdets[None]
    torch.testing.assert_close(ts.double(), ref, rtol=1e-4, atol=1e-3)
    assert torch.equal(ts.argmin(1), ref.argmin(1))
    # nearest-stats: float32 batched scores pick the same experts as the float64 formula
    ns = NearestStatsRouter(dict(zip(synth, stats)))
    x = feats.double()
    ref_ns = torch.stack([-0.5 * (((x - s.mean.double()) @ torch.linalg.inv(s.cov.double())) * (x - s.mean.double())).sum(1)
                          - 0.5 * torch.linalg.slogdet(s.cov.double())[1] - 0.5 * DIM * math.log(2 * math.pi)
                          for s in stats], 1)
    torch.testing.assert_close(ns.scores(feats).double(), ref_ns, rtol=1e-4, atol=1e-2)
    assert torch.equal(ns.route(feats, 2).indices, ref_ns.topk(2, 1).indices)
    # the learned router routes with the same batched scores
    r = SparseRouter.from_stats(dict(zip(synth, stats)), RouterConfig(cold_steps=20, pool=512))
    routed = r.route(feats, 2)
    assert torch.equal(routed.fallback, old > 0)
    assert torch.equal(routed.indices, r.scores(feats).topk(2, 1).indices)


def test_scoring_only_the_routed_candidates_keeps_every_decision(synth):
    """OOD scored on the router's top-k candidates first: the same fallback decisions as scoring
    every task, the exact score wherever it is > 0, an upper bound <= 0 elsewhere; in-distribution
    rows are not scored over every task."""
    from clipzoo.router.ranpac import RanpacRouter

    stats = dict(zip(synth, (s for s, _ in synth.values())))
    r = RanpacRouter.from_stats(stats)
    g = torch.Generator().manual_seed(3)
    feats = torch.cat([x for _, x in synth.values()] + [F.normalize(torch.randn(100, DIM, generator=g), dim=1)])
    full = r.ood.score(feats)
    assert 0 < int((full > 0).sum()) < len(feats)  # both kinds of rows are exercised
    # rows within float noise of the threshold may fall either way through another computation path
    clear = (full.abs() > 1e-3).nonzero()[:, 0]
    assert len(clear) > len(feats) - 5
    for k in (1, 2):
        cand = r.route(feats, k).indices
        fast = r.ood.score(feats, candidates=cand)
        assert torch.equal(fast[clear] > 0, full[clear] > 0)
        torch.testing.assert_close(fast[full > 0], full[full > 0], rtol=1e-4, atol=1e-3)
        inside = clear[full[clear] <= 0]
        assert (fast[inside] <= 0).all() and (fast[full <= 0] >= full[full <= 0] - 1e-3).all()
        assert torch.equal(r.route(feats, k).fallback[clear], full[clear] > 0)
    seen = []
    real = r.ood.score
    r.ood.score = lambda f, padded=None, candidates=None: seen.append(len(f)) or real(f, padded, candidates)
    r.route(torch.cat([x for _, x in synth.values()]))
    assert seen[0] == 400 and sum(seen[1:]) < 40  # the full pass only for the few undecided rows


def test_groups_pad_every_row_once_and_bound_the_padding():
    """Rows grouped by owner: every row lands once, in its owner's group, in source order; a part's
    padded size stays within twice its rows; pad then take gives the rows back."""
    g = torch.Generator().manual_seed(0)
    owner = torch.cat([torch.zeros(300, dtype=torch.long), torch.randint(1, 40, (200,), generator=g)])
    owner = owner[torch.randperm(len(owner), generator=g)]
    x = torch.randn(len(owner), 3, generator=g)
    whole = Groups.of(owner)
    parts = whole.parts()
    assert len(parts) > 1                     # one big group and many small ones are not padded together
    rows = torch.cat([p.rows for p in parts])
    assert sorted(rows.tolist()) == list(range(len(owner)))
    for p in parts:
        assert len(p.owners) * p.width <= 2 * len(p.rows)
        assert torch.equal(p.owners[p.group], owner[p.rows])
        assert all((p.rows[p.group == j].diff() > 0).all() for j in range(len(p.owners)))
        assert torch.equal(p.take(p.pad(x)), x[p.rows])
    assert Groups.of(torch.full((5,), 3)).parts()[0].width == 5


def test_stats_are_float32_and_old_float64_files_still_load(synth, tmp_path):
    from safetensors.torch import load_file, save_file

    from clipzoo.router.stats import STATS_FILE

    s = next(iter(synth.values()))[0]
    s.save(tmp_path)
    saved = load_file(str(tmp_path / STATS_FILE))
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k != "ood_quantiles")
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.double().contiguous() for k, v in saved.items()}, str(old / STATS_FILE))   # as before
    back = TaskStats.load(old)
    assert back.class_cov.dtype == torch.float32
    for f in ("mean", "cov", "class_means", "class_counts", "class_cov"):
        torch.testing.assert_close(getattr(back, f), getattr(s, f))
    det_old, det_new = detector_from_stats([back]), detector_from_stats([TaskStats.load(tmp_path)])
    x = next(iter(synth.values()))[1]
    assert torch.equal(det_old.score(x) > 0, det_new.score(x) > 0)


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    balanced = torch.eye(4) * 50
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 50
    assert float(balance_loss(balanced)) == pytest.approx(1.0, abs=1e-4)
    assert float(balance_loss(collapsed)) == pytest.approx(4.0, abs=1e-4)
    r = SparseRouter(DIM, RouterConfig(steps=20, balance=0.1))
    for i, (stats, _) in enumerate(_synthetic_stats(2, DIM, seed=2, per_class=12)):
        r.add(f"s{i}", stats)
    assert r.info["steps"] == 20


def test_router_config_rejects_bad_settings():
    with pytest.raises(ConfigError):
        RouterConfig(steps=0)
    with pytest.raises(ConfigError):
        RouterConfig.from_dict({"hidden": 8, "colour": "red"})


# ----- in the zoo ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned_zoo(tmp_path_factory, builtin_tasks):
    z = Zoo.create(tmp_path_factory.mktemp("zoo") / "zoo")
    z.refresh_router(kind="learned")
    for name in ("shapes", "colours"):
        z.add_task(builtin_tasks[name], train=TrainSettings(epochs=2, batch_size=32))
    return z


def _copy(z: Zoo, tmp_path) -> Zoo:
    shutil.copytree(z.root, tmp_path / "zoo")
    return Zoo.open(tmp_path / "zoo")


def test_zoo_keeps_a_versioned_verified_router_file(learned_zoo):
    spec = learned_zoo.registry["router"]
    assert spec["kind"] == "learned" and spec["version"] == 3
    assert sorted(spec["files"]) == ["router/router-v3.json", "router/router-v3.safetensors"]
    assert learned_zoo.verify()["ok"]
    r = Zoo.open(learned_zoo.root).router()
    assert isinstance(r, SparseRouter) and r.names == ["shapes", "colours"]


def test_adding_a_task_leaves_old_experts_untouched(learned_zoo, builtin_tasks, tmp_path):
    z = _copy(learned_zoo, tmp_path)
    before = snapshot(z.root / "experts")
    z.add_task(builtin_tasks["textures"], train=TrainSettings(epochs=1, batch_size=32))
    after = snapshot(z.root / "experts")
    assert {k: v for k, v in after.items() if not k.startswith("textures/")} == before
    assert z.registry["router"]["version"] == 4 and z.verify()["ok"]
    assert z.router().names == ["shapes", "colours", "textures"]


@pytest.mark.parametrize("where", ["registry", "router"])
def test_a_failed_add_leaves_the_zoo_exactly_as_it_was(learned_zoo, builtin_tasks, tmp_path, monkeypatch, where):
    z = _copy(learned_zoo, tmp_path)
    before = snapshot(z.root)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(*(registry, "write", boom) if where == "registry" else (SparseRouter, "add", boom))
    with pytest.raises(OSError):
        z.add_task(builtin_tasks["textures"], train=TrainSettings(epochs=1, batch_size=32))
    assert snapshot(z.root) == before
    assert Zoo.open(z.root).verify()["ok"]


def test_verify_catches_a_tampered_router_file(learned_zoo, tmp_path):
    z = _copy(learned_zoo, tmp_path)
    path = z.root / "router" / "router-v3.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    rep = z.verify()
    assert not rep["ok"] and any("router-v3.safetensors" in p for p in rep["problems"])


def test_remove_and_refresh_update_the_router(learned_zoo, tmp_path):
    z = _copy(learned_zoo, tmp_path)
    z.remove("colours")
    assert z.router().names == ["shapes"] and z.registry["router"]["version"] == 4 and z.verify()["ok"]
    spec = z.refresh_router(kind="nearest-stats")
    assert spec["files"] == {} and isinstance(Zoo.open(z.root).router(), NearestStatsRouter)
    assert not list((z.root / "router").glob("router-v3*"))      # older versions are pruned
    spec = z.refresh_router(kind="learned", ood_quantile=0.9)
    assert spec["version"] == 6 and spec["ood_quantile"] == 0.9 and z.router().ood_quantile == 0.9
    with pytest.raises(ConfigError):
        z.refresh_router(kind="magic")


def test_predictions_carry_fallback_and_zero_shot_answers(learned_zoo, builtin_tasks):
    x = learned_zoo.features(builtin_tasks["shapes"].test.images[:8])
    far = -F.normalize(x.mean(0, keepdim=True), dim=1)    # the opposite direction: no known task
    preds = learned_zoo.predict_features(torch.cat([x, far]), top_k=2)
    assert all({"task", "label", "score", "routing", "fallback", "ood_score"} <= set(p) for p in preds)
    assert preds[-1]["fallback"] is True and preds[-1]["task"] is None
    assert sum(p["fallback"] for p in preds[:-1]) <= 2
    known = {c for r in learned_zoo.registry["experts"].values() for c in r["classes"]}
    assert preds[-1]["label"] in known
    mine = learned_zoo.predict_features(far, classes=["boat", "tree"])
    assert mine[0]["label"] in {"boat", "tree"}
    forced = learned_zoo.predict_features(far, fallback=False)
    assert forced[0]["fallback"] is False and forced[0]["task"] in learned_zoo.names
    given = learned_zoo.predict_features(far, task="shapes")
    assert given[0]["fallback"] is False and given[0]["task"] == "shapes"
    with pytest.raises(ConfigError):
        learned_zoo.predict_features(far, classes=[])


def test_cli_predict_json_has_fallback_and_routing(learned_zoo, builtin_tasks, tmp_path):
    from clipzoo.cli import main

    img = tmp_path / "x.png"
    builtin_tasks["colours"].test.images[0].save(img)
    res = CliRunner().invoke(main, ["predict", "--zoo", str(learned_zoo.root), "--top-k", "2", "--json",
                                    "--classes", "red,blue", str(img)])
    assert res.exit_code == 0, res.output
    (p,) = json.loads(res.output)
    assert isinstance(p["fallback"], bool) and 1 <= len(p["routing"]) <= 2
    assert p["label"] in ({"red", "blue"} if p["fallback"] else set(builtin_tasks["colours"].classes))


def test_bench_router_sequence_lodo_and_scale(builtin_tasks, tmp_path):
    from clipzoo.bench.router import lodo_bench

    tasks = [builtin_tasks["shapes"], builtin_tasks["colours"]]
    res = sequence_bench(tasks, RouterBenchSettings(epochs=1), tmp_path / "zoo", seed=0)
    last = res["per_step"][-1]
    assert set(last["test"]) >= {"ranpac", "learned", "nearest-stats"} and last["experts"] == 2
    for split in ("test", "val"):
        m = last[split]["ranpac"]
        # an answer counts only when routed to its own task: never above routing accuracy
        assert m["answer_acc"] <= m["routing_acc"] and m["expert_acc"] <= m["routing_acc"]
    assert len(res["grid"]) == 36 and res["chosen_on_validation"] in [
        {k: g[k] for k in ("shrinkage", "answer_weight", "head_shrinkage")}
        for g in res["grid"] if g["val"] == max(x["val"] for x in res["grid"])]
    # answer_weight 0 is the expert alone: the grid's cell equals the routed expert's accuracy
    zero = [g for g in res["grid"] if g["answer_weight"] == 0.0 and g["shrinkage"] == 0.01][0]
    assert zero["test"] == last["test"]["ranpac"]["expert_acc"]
    lo = lodo_bench(tasks + [builtin_tasks["textures"]], RouterBenchSettings(), Zoo.create(tmp_path / "z2"))
    assert set(lo["per_heldout_domain"]) == {"shapes", "colours", "textures"}
    assert lo["worst"]["auroc"] <= lo["mean"]["auroc"]
    out = CliRunner().invoke(main, ["bench-router", "--scale", "3", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["scale"]["per_added_task"]
    assert [r["experts"] for r in rows] == [1, 2, 3]
    bad = CliRunner().invoke(main, ["bench-router"])
    assert bad.exit_code == 1 and bad.output.startswith("error: nothing to run")


def test_cli_router_shows_and_switches_the_policy(learned_zoo, tmp_path):
    z = _copy(learned_zoo, tmp_path)
    before = snapshot(z.root / "experts")
    shown = CliRunner().invoke(main, ["router", "--zoo", str(z.root), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["version"] == 3 and json.loads(shown.output)["experts"] == ["shapes", "colours"]
    out = CliRunner().invoke(main, ["router", "--zoo", str(z.root), "--kind", "nearest-stats", "--ood-quantile", "0.995"])
    assert out.exit_code == 0 and "router nearest-stats v4 over 2 experts" in out.output
    assert isinstance(Zoo.open(z.root).router(), NearestStatsRouter) and Zoo.open(z.root).router().ood.q == 0.995
    bad = CliRunner().invoke(main, ["router", "--zoo", str(z.root), "--ood-quantile", "1.5"])
    assert bad.exit_code != 0 and "quantile must be in (0, 1)" in bad.output
    assert Zoo.open(z.root).registry["router"]["version"] == 4 and snapshot(z.root / "experts") == before


def test_the_previous_router_version_is_pruned_once_no_reader_holds_it(learned_zoo, tmp_path):
    import gc

    z = _copy(learned_zoo, tmp_path)
    z.refresh_router()
    current = lambda: sorted(f"router/{p.name}" for p in (z.root / "router").iterdir())  # noqa: E731
    assert current() == sorted(z.registry["router"]["files"])     # the previous version went at the commit
    other = Zoo.open(z.root)                                        # another reader of this process
    old = set(z.registry["router"]["files"])
    z.refresh_router()
    assert old <= set(current())                                    # kept while it may read it
    assert other.router().names == z.router().names
    del other
    gc.collect()
    z.refresh_router()
    assert current() == sorted(z.registry["router"]["files"])


def test_ood_scores_keep_float64_precision_at_vit_width():
    """At ViT-B-32's 512-d features packed tightly around a common direction (as CLIP's are), an
    input's whitened norm is far larger than its distance to a class; the float32 scores (all
    tasks, and the routed candidates through each task's own map) still stay within 1e-4 of the
    float64 per-task reference, because the maps work on centred inputs."""
    g = torch.Generator().manual_seed(5)
    dim, classes, per_class = 512, 4, 200
    common = F.normalize(torch.randn(dim, generator=g), dim=0)
    stats, feats = [], []
    for _ in range(3):
        means = common + 0.05 * F.normalize(torch.randn(classes, dim, generator=g), dim=1)
        y = torch.arange(classes).repeat_interleave(per_class)
        x = F.normalize(means[y] + 0.02 / dim ** 0.5 * torch.randn(len(y), dim, generator=g), dim=1)
        stats.append(compute_stats(x, y, classes))
        feats.append(x[::10])
    det = detector_from_stats(stats)
    feats = torch.cat(feats)
    ref = _old_ood_scores(stats, det, feats)
    torch.testing.assert_close(det.score(feats).double(), ref, rtol=1e-4, atol=1e-3)
    own = torch.arange(len(stats)).repeat_interleave(len(feats) // len(stats))[:, None]
    per_task = det.task_scores(feats).double()
    torch.testing.assert_close(det._candidate_scores(feats, own).double(), per_task.gather(1, own)[:, 0],
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(per_task.min(1).values - det.threshold, ref, rtol=1e-4, atol=1e-3)
