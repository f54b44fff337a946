"""The default ranpac router: class posterior routing, its answers, updates and stored statistics."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipzoo.errors import ConfigError, RegistryError
from clipzoo.router.groups import Groups
from clipzoo.router.random_features import PROJECTION_DIM, RANK, projection
from clipzoo.router.ranpac import RanpacConfig, RanpacRouter
from clipzoo.router.stats import TaskStats, compute_stats
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

DIM = 32


def _task(seed: int, n_per_class: int = 30, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(DIM, generator=g), dim=0) + 0.6 * F.normalize(torch.randn(classes, DIM, generator=g), dim=1)
    y = torch.arange(classes).repeat(n_per_class)
    return F.normalize(means[y] + 0.4 / DIM ** 0.5 * torch.randn(len(y), DIM, generator=g), dim=1), y


@pytest.fixture(scope="module")
def stats():
    return {f"t{i}": compute_stats(*_task(i), 4) for i in range(3)}


def test_projection_is_fixed_by_its_seed():
    assert torch.equal(projection(DIM), projection(DIM))
    assert not torch.equal(projection(DIM, seed=1), projection(DIM))
    assert projection(DIM).shape == (DIM, PROJECTION_DIM)


def test_stats_keep_no_image_and_do_not_grow_with_the_data():
    small, large = compute_stats(*_task(0, n_per_class=10), 4), compute_stats(*_task(0, n_per_class=60), 4)
    shapes = lambda s: {k: tuple(v.shape) for k, v in vars(s).items()}  # noqa: E731
    assert shapes(small) == shapes(large)
    assert shapes(small)["rp_means"] == (4, PROJECTION_DIM) and shapes(small)["rp_factor"] == (PROJECTION_DIM, RANK)


def test_routes_separable_tasks_and_gives_class_posteriors(stats):
    r = RanpacRouter.from_stats(stats)
    x = torch.cat([_task(i, n_per_class=5)[0] for i in range(3)])
    truth = torch.arange(3).repeat_interleave(20)
    routing = r.route(x, k=2)
    assert bool((routing.indices[:, 0] == truth).all())
    for name, lp in routing.class_logp.items():   # log p(class | x, task): rows sum to one
        assert torch.allclose(lp.exp().sum(1), torch.ones(len(x)), atol=1e-4)


def test_task_scores_are_each_tasks_log_mass_and_always_finite(stats):
    """``log p(task | x)`` is the log-sum-exp of the task's class log-posteriors (float64
    reference), finite even for tasks whose classes are thousands of nats below the best; the
    rows of the rows-only posterior equal the full posterior's rows."""
    r = RanpacRouter.from_stats(stats)
    x = torch.cat([_task(i, n_per_class=5)[0] for i in range(3)])
    lp = r.class_log_posterior(x)
    lp[:, 4:8] -= 5000.0   # a task far below every other
    ref = torch.stack([lp.double()[:, 4 * t:4 * t + 4].logsumexp(1) for t in range(3)], 1)
    got = r.task_scores(lp)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    post = r.route(x).class_logp
    assert "t1" in post and "t9" not in post
    names = ["t0", "t1", "t9"]
    rows = {"t0": [1, 2], "t1": [0, 7, 3], "t9": [5]}
    g = Groups.of(torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([1, 2, 0, 7, 3, 5]))
    padded = post.padded(names, g)   # each group's rows only, one batched product
    for j, n in enumerate(names):
        got = padded[j, :len(rows[n])]
        want = post[n][rows[n]] if n in post else torch.zeros_like(got)  # an unknown task adds nothing
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_add_then_remove_equals_building_without_it(stats):
    grown = RanpacRouter.from_stats({k: stats[k] for k in ("t0", "t1")})
    grown.add("t2", stats["t2"])
    grown.remove("t1", stats["t1"])
    direct = RanpacRouter.from_stats({k: stats[k] for k in ("t0", "t2")})
    assert grown.names == direct.names
    x = torch.cat([_task(i, n_per_class=3)[0] for i in range(3)])
    assert torch.allclose(grown.scores(x), direct.scores(x), atol=1e-3)
    with pytest.raises(RegistryError):
        grown.add("t0", stats["t0"])
    with pytest.raises(ConfigError):
        RanpacConfig(shrinkage=2.0)


def test_torch_and_numpy_updates_give_the_same_router(stats, monkeypatch):
    """Adding and removing tasks in a process with torch loaded (in-place scatter update, Cholesky
    solve) and without it (numpy, as ``clipzoo remove`` runs) gives the same scatter and weights;
    a covariance that is not positive definite (no shrinkage, rank-deficient scatter) still solves."""
    import numpy as np

    from clipzoo.router import lda

    def build() -> RanpacRouter:
        r = RanpacRouter.from_stats({k: stats[k] for k in ("t0", "t1")})
        r.add("t2", stats["t2"])
        r.remove("t0", stats["t0"])
        return r

    with_torch = build()
    monkeypatch.setattr(lda, "_loaded_torch", lambda: None)
    without = build()
    np.testing.assert_allclose(with_torch.scatter, without.scatter, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(with_torch.w, without.w, rtol=1e-4, atol=1e-6 * np.abs(without.w).max())
    monkeypatch.undo()
    indefinite, rhs = np.diag([1.0, -1.0, 2.0]), np.ones((3, 2))
    np.testing.assert_allclose(lda.solve_spd(indefinite, rhs), np.linalg.solve(indefinite, rhs))


def test_router_file_keeps_half_the_scatter_and_loads_older_full_files(stats, tmp_path):
    """The router file holds the symmetric scatter sum's upper triangle (float32); loading gives
    the full matrix back, and a file of an older clipzoo (the full matrix) loads the same."""
    import numpy as np
    from safetensors.numpy import load_file as load_np, save_file as save_np

    r = RanpacRouter.from_stats(stats)
    files = r.save(tmp_path, "router-v1")
    weights, meta = (tmp_path / f for f in files)
    state = load_np(str(weights))
    m = PROJECTION_DIM
    assert "scatter" not in state and state["scatter_upper"].shape == (m * (m + 1) // 2,)
    back = RanpacRouter.load(weights, meta, stats.__getitem__)
    np.testing.assert_allclose(back.scatter, r.scatter, rtol=1e-6, atol=1e-6 * np.abs(r.scatter).max())
    assert np.array_equal(back.scatter, back.scatter.T)
    x = torch.cat([_task(i, n_per_class=3)[0] for i in range(3)])
    # the full matrix as an older clipzoo wrote it (float32 values, so the comparison is exact)
    older = {k: v for k, v in state.items() if k != "scatter_upper"} | {"scatter": back.scatter.astype(np.float32)}
    save_np(older, str(weights))
    assert np.array_equal(RanpacRouter.load(weights, meta, stats.__getitem__).scatter, back.scatter)
    back.add("t9", stats["t0"])   # an update from the loaded file solves as one from the statistics
    fresh = RanpacRouter.from_stats({**stats, "t9": stats["t0"]})
    assert torch.allclose(back.scores(x), fresh.scores(x), atol=1e-3)
    save_np({**state, "scatter_upper": state["scatter_upper"][:-1]}, str(weights))
    with pytest.raises(RegistryError, match="rebuild"):
        RanpacRouter.load(weights, meta, stats.__getitem__)


@pytest.mark.parametrize("m", [1, 2, 127, 128, 129, 300])
def test_packed_triangle_round_trips_at_sizes_off_the_tile(m):
    """Packing keeps the upper triangle row by row; unpacking mirrors it tile by tile, also where
    ``M`` is not a multiple of the tile: the float32-rounded symmetric matrix comes back."""
    import numpy as np

    from clipzoo.router.lda import pack_upper, unpack_upper

    a = np.random.default_rng(m).standard_normal((m, m))
    a = a + a.T
    packed = pack_upper(a)
    assert np.array_equal(packed, a[np.triu_indices(m)].astype(np.float32))
    assert np.array_equal(unpack_upper(packed, m), a.astype(np.float32).astype(np.float64))


def test_stats_of_older_versions_load_but_cannot_join(stats, tmp_path):
    s = stats["t0"]
    save_file({k: v.contiguous() for k, v in vars(s).items() if not k.startswith("rp_")}, str(tmp_path / "stats.safetensors"))
    old = TaskStats.load(tmp_path)
    assert old.rp_means is None
    with pytest.raises(RegistryError, match="add it again"):
        RanpacRouter.from_stats({"old": old})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, builtin_tasks):
    z = Zoo.create(tmp_path_factory.mktemp("ranpac") / "zoo")
    for name in ("shapes", "colours", "textures"):
        z.add_task(builtin_tasks[name], train=TrainSettings(epochs=2, batch_size=32))
    return z


def test_a_new_zoo_routes_with_ranpac_and_files_it(zoo):
    spec = zoo.registry["router"]
    assert spec["kind"] == "ranpac" and sorted(spec["files"]) == ["router/router-v3.json", "router/router-v3.safetensors"]
    assert isinstance(Zoo.open(zoo.root).router(), RanpacRouter) and zoo.verify()["ok"]


def test_answers_do_not_depend_on_the_batch(zoo, builtin_tasks):
    """An image's routed answer is the same alone or inside any mixed batch (no batch-level vote)."""
    x = torch.cat([zoo.features(builtin_tasks[n].test.images[:6]) for n in ("shapes", "colours", "textures")])
    together = zoo.predict_features(x)
    shuffled = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    mixed = zoo.predict_features(x[shuffled])
    for j, i in enumerate(shuffled.tolist()):
        alone = zoo.predict_features(x[i:i + 1])[0]
        for other in (together[i], mixed[j]):
            assert (other["task"], other["label"], other["fallback"]) == (alone["task"], alone["label"], alone["fallback"])
            assert other["score"] == pytest.approx(alone["score"], abs=1e-4)


def test_the_class_posterior_changes_answers_only_through_its_weight(zoo, builtin_tasks):
    x = zoo.features(builtin_tasks["textures"].test.images)
    plain = zoo.predict_features(x, task="textures")
    with torch.no_grad():
        expert = zoo.expert("textures")(x).softmax(1).max(1).values
    r = zoo.router()
    r.config = RanpacConfig(shrinkage=r.config.shrinkage, answer_weight=0.0)
    alone = zoo.predict_features(x, task="textures")
    assert [p["score"] for p in alone] == pytest.approx(expert.tolist(), abs=1e-5)
    r.config = RanpacConfig(shrinkage=r.config.shrinkage, answer_weight=0.25)
    assert [p["score"] for p in plain] != pytest.approx([p["score"] for p in alone], abs=1e-5)


def test_remove_subtracts_the_task_and_stays_consistent(zoo, tmp_path):
    shutil.copytree(zoo.root, tmp_path / "zoo")
    z = Zoo.open(tmp_path / "zoo")
    z.remove("colours")
    fresh = RanpacRouter.from_stats({n: z.stats(n) for n in z.names})
    x = torch.randn(5, z.backbone.embed_dim)
    assert z.router().names == ["shapes", "textures"] and z.verify()["ok"]
    assert torch.allclose(Zoo.open(z.root).router().scores(x), fresh.scores(x), rtol=1e-3, atol=1e-2)
    saved = load_file(str(next((z.root / "router").glob("*.safetensors"))))
    assert saved["means"].shape[0] == sum(len(z.record(n)["classes"]) for n in z.names)


def test_answers_for_a_given_task_never_change_as_tasks_arrive(builtin_tasks, tmp_path):
    """Each task's class head is fixed when it is added: adding another task changes routing
    only, never what the zoo answers for an old task given its id (oracle forgetting stays 0)."""
    z = Zoo.create(tmp_path / "zoo")
    for name in ("shapes", "colours"):
        z.add_task(builtin_tasks[name], train=TrainSettings(epochs=1, batch_size=32))
    x = z.features(builtin_tasks["shapes"].test.images)
    before = z.predict_features(x, task="shapes")
    z.add_task(builtin_tasks["textures"], train=TrainSettings(epochs=1, batch_size=32))
    after = Zoo.open(z.root).predict_features(x, task="shapes")
    assert [p["label"] for p in after] == [p["label"] for p in before]
    assert [p["score"] for p in after] == pytest.approx([p["score"] for p in before], abs=1e-6)
