"""Shared fixtures. Real image data is found via --data-dir, $CLIPZOO_DATA or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=None, help="root of the real ImageFolder domains (<domain>/{train,test})")


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
    """Keep the feature cache of the test session out of the user's home."""
    old = os.environ.get("CLIPZOO_CACHE")
    os.environ["CLIPZOO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CLIPZOO_CACHE", None)
    else:
        os.environ["CLIPZOO_CACHE"] = old


@pytest.fixture(scope="session")
def data_root(request) -> Path:
    """The real domains; skips (with the reason) when they are not on this machine, but fails when
    ``CLIPZOO_REQUIRE_DATA=1`` (set by ``.ci/run``: CI must run the real-data tests)."""
    opt = request.config.getoption("--data-dir") or os.environ.get("CLIPZOO_DATA")
    root = Path(opt) if opt else REPO.parent / "shared" / "data"
    if not (root / "mnist" / "train").is_dir():
        why = f"real image data not found at {root}: pass --data-dir or set CLIPZOO_DATA"
        if os.environ.get("CLIPZOO_REQUIRE_DATA") == "1":
            pytest.fail(f"{why} (CLIPZOO_REQUIRE_DATA=1: required here)", pytrace=False)
        pytest.skip(why)
    return root


@pytest.fixture(scope="session")
def builtin_tasks():
    """Small versions of the built-in synthetic domains (fast)."""
    from clipzoo.tasks.data import builtin_domains, load_builtin

    return {d: load_builtin(d, n_train=24, n_test=8) for d in builtin_domains()}


@pytest.fixture(scope="session")
def served_zoo(tmp_path_factory, builtin_tasks):
    """A zoo of two built-in tasks and mixed test images (PIL) from both, for the serving tests
    (read only: a test that changes it works on a copy)."""
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    root = tmp_path_factory.mktemp("served") / "zoo"
    z = Zoo.create(root)
    for name in ("shapes", "colours"):
        z.add_task(builtin_tasks[name], train=TrainSettings(epochs=5, batch_size=32))
    return root, [im for name in ("shapes", "colours") for im in builtin_tasks[name].test.images[:4]]


@pytest.fixture
def fast_train():
    from clipzoo.zoo.train import TrainSettings

    return TrainSettings(epochs=5, batch_size=32)


@pytest.fixture
def empty_zoo(tmp_path):
    from clipzoo.zoo.zoo import Zoo

    return Zoo.create(tmp_path / "zoo")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock) with its bytes: to prove a zoo did not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}
