"""The zoo as a database (issue 14): containment, transactions, isolation, durability, validation
and a full disk. Each test feeds a hostile or failing case through the commands that write."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import REPO as SRC, snapshot
from clipzoo.cli import main
from clipzoo.errors import ConfigError, IntegrityError, RegistryError
from clipzoo.zoo import leases, registry
from clipzoo.zoo.experts.stack import ExpertOptions
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def base(tmp_path_factory, builtin_tasks) -> Path:
    """A zoo with two experts (shapes, colours) and a learned router."""
    z = Zoo.create(tmp_path_factory.mktemp("db") / "zoo")
    for name in ("shapes", "colours"):
        z.add_task(builtin_tasks[name], train=TrainSettings(epochs=2, batch_size=32))
    return z.root


@pytest.fixture
def zoo(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "zoo"))


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(out) -> str:
    lines = out.output.strip().splitlines()
    assert out.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    return lines[0]


def edit_registry(root: Path, edit) -> None:
    reg = json.loads((root / "registry.json").read_text())
    edit(reg)
    (root / "registry.json").write_text(json.dumps(reg, indent=2))


# ----- 1. containment ------------------------------------------------------------------------------
def _hostile_source(reg: dict) -> None:
    rec = dict(reg["experts"]["colours"], name="../../victim", sources=["shapes"], kind="fusion")
    reg["experts"]["../../victim"] = rec


def _absolute_router(reg: dict) -> None:
    reg["router"]["files"] = {"/tmp/router-v9.json": "0" * 64, "/tmp/router-v9.safetensors": "0" * 64}


@pytest.mark.parametrize("edit", [_hostile_source, _absolute_router])
def test_hostile_registry_is_refused_by_every_writer(zoo, tmp_path, edit):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    edit_registry(zoo, edit)
    before = snapshot(zoo)
    for args in (["remove", "--zoo", str(zoo), "--name", "shapes", "--cascade"],
                 ["remove", "--zoo", str(zoo), "--name", "../../victim"],
                 ["router", "--zoo", str(zoo), "--rebuild"], ["repair", "--zoo", str(zoo), "--yes"]):
        one_line_error(cli(*args))
    assert (victim / "keep.txt").read_text() == "mine" and snapshot(zoo) == before


def test_experts_folder_linked_outside_is_refused(zoo, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(zoo / "experts", outside)
    (zoo / "experts").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    for args in (["remove", "--zoo", str(zoo), "--name", "shapes"],
                 ["remove", "--zoo", str(zoo), "--name", "colours", "--cascade"]):
        assert "outside the zoo" in one_line_error(cli(*args))
    assert snapshot(outside) == before and set(Zoo.open(zoo).names) == {"shapes", "colours"}


def test_expert_folder_linked_outside_is_refused(zoo, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(zoo / "experts" / "shapes", outside)
    (zoo / "experts" / "shapes").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    assert "outside the zoo" in one_line_error(cli("remove", "--zoo", str(zoo), "--name", "shapes"))
    assert snapshot(outside) == before
    with pytest.raises(RegistryError, match="outside the zoo"):
        Zoo.open(zoo).expert("shapes")


def test_router_folder_linked_outside_is_refused(zoo, tmp_path):
    outside = tmp_path / "router-elsewhere"
    shutil.move(zoo / "router", outside)
    (zoo / "router").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    assert "outside the zoo" in one_line_error(cli("router", "--zoo", str(zoo), "--rebuild"))
    assert "outside the zoo" in one_line_error(cli("remove", "--zoo", str(zoo), "--name", "colours"))
    assert snapshot(outside) == before


def test_pull_force_over_a_linked_expert_writes_nothing_outside(server, built, tmp_path):  # noqa: F811
    from clipzoo.zoo import hub

    hub.push(built["zoo"], "me/zoo")
    local = Path(shutil.copytree(built["other"], tmp_path / "other"))
    outside = tmp_path / "outside-shapes"
    shutil.move(local / "experts" / "shapes", outside)
    (local / "experts" / "shapes").symlink_to(outside, target_is_directory=True)
    before, zoo_before = snapshot(outside), snapshot(local)
    out = cli("pull", "me/zoo", "--zoo", str(local), "--only", "shapes", "--force")
    assert "outside the zoo" in one_line_error(out)
    assert snapshot(outside) == before and snapshot(local) == zoo_before


# ----- 2. transactions and repair ----------------------------------------------------------------------
def test_pull_of_an_expert_that_does_not_load_leaves_the_zoo_identical(server, built, tmp_path):  # noqa: F811
    from test_hub_hardening import refused, replace_file

    from clipzoo.zoo import hub

    hub.push(built["zoo"], "me/zoo")
    stats = load_file(str(built["zoo"] / "experts" / "colours" / "stats.safetensors"))
    del stats["class_cov"]  # hashes match, content does not load (as an older version's file would)
    tmp = tmp_path / "stats.safetensors"
    save_file(stats, str(tmp))
    replace_file(server, "experts/colours/stats.safetensors", tmp.read_bytes())
    local = Path(shutil.copytree(built["other"], tmp_path / "other"))
    refused(local, IntegrityError, "colours")
    assert Zoo.open(local).verify()["ok"]


def test_repair_shows_then_drops_what_cannot_be_validated(zoo):
    (zoo / "experts" / "colours" / "stats.safetensors").unlink()
    before = snapshot(zoo)
    out = cli("repair", "--zoo", str(zoo))
    assert out.exit_code == 1 and "drop expert colours" in out.output and snapshot(zoo) == before
    out = cli("repair", "--zoo", str(zoo), "--yes", "--json")
    rep = json.loads(out.output)
    assert out.exit_code == 0 and rep["applied"] and list(rep["drop"]) == ["colours"]
    z = Zoo.open(zoo)
    assert z.names == ["shapes"] and z.verify()["ok"] and z.router().names == ["shapes"]
    assert not (zoo / "experts" / "colours").exists()
    out = cli("repair", "--zoo", str(zoo))
    assert out.exit_code == 0 and out.output.startswith("ok")


def test_repair_rebuilds_a_router_that_does_not_match(zoo):
    meta = zoo / next(f for f in registry.read(zoo)["router"]["files"] if f.endswith(".json"))
    data = json.loads(meta.read_text())
    data["names"] = ["shapes", "other"]
    meta.write_text(json.dumps(data))
    edit_registry(zoo, lambda reg: reg["router"]["files"].update({f"router/{meta.name}": registry.sha256_file(meta)}))
    rep = Zoo.open(zoo).repair(dry_run=True)
    assert rep["drop"] == {} and rep["router"]
    Zoo.open(zoo).repair(dry_run=False)
    assert Zoo.open(zoo).verify()["ok"]


# ----- 3. isolation -------------------------------------------------------------------------------------
READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from clipzoo.tasks.data import load_builtin
    from clipzoo.zoo.zoo import Zoo
    root, ready, go = map(Path, sys.argv[1:4])
    images = [im for d in ("shapes", "colours") for im in load_builtin(d, 2, 8).test.images] * 8
    z = Zoo.open(root)
    ready.write_text("ready")
    t0 = time.time()
    while not go.exists() and time.time() - t0 < 120:
        time.sleep(0.1)
    preds = z.predict(images, top_k=2)
    print(json.dumps({"n": len(images), "answered": sum(p.get("label") is not None for p in preds),
                      "tasks": sorted({p["task"] for p in preds if p.get("task")})}))
""")


def test_a_reader_keeps_its_version_while_writers_commit(zoo, tmp_path):
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC / "tests")}
    reader = subprocess.Popen([sys.executable, "-c", READER, str(zoo), str(ready), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not ready.exists():
            assert reader.poll() is None and time.time() - t0 < 120, reader.stderr.read() if reader.poll() else "slow"
            time.sleep(0.1)
        clipzoo = [sys.executable, "-c", "from clipzoo.cli import main; main()"]
        for args in (["remove", "--zoo", str(zoo), "--name", "colours"], ["router", "--zoo", str(zoo), "--rebuild"],
                     ["router", "--zoo", str(zoo), "--rebuild"]):
            done = subprocess.run(clipzoo + args, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
        assert (zoo / "experts" / "colours").is_dir()  # kept for the live reader
        go.write_text("go")
        out, err = reader.communicate(timeout=240)
    finally:
        reader.kill() if reader.poll() is None else None
    assert reader.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["answered"] == result["n"] > 0 and "colours" in result["tasks"]
    before = set(registry.read(zoo)["router"]["files"])
    Zoo.open(zoo).refresh_router()  # the next writer, with no other reader, collects the garbage
    reg = registry.read(zoo)
    assert not (zoo / "experts" / "colours").exists()  # only the current router stays (issue 15: pruned)
    assert {f"router/{p.name}" for p in (zoo / "router").iterdir()} == set(reg["router"]["files"])
    assert not before & set(reg["router"]["files"])


# ----- 4. durability and hygiene ------------------------------------------------------------------------
def test_files_follow_the_umask(tmp_path, builtin_tasks):
    old = os.umask(0o027)
    try:
        z = Zoo.create(tmp_path / "zoo")
        z.add_task(builtin_tasks["shapes"], train=TrainSettings(epochs=1, batch_size=32))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(z.root)): p.stat().st_mode & 0o777 for p in z.root.rglob("*")
             if p.is_file() and ".readers" not in p.parts and p.name != ".lock"}
    assert modes and all(m == 0o640 for m in modes.values()), modes


def test_files_are_fsynced_before_the_registry_names_them(tmp_path, builtin_tasks, monkeypatch):
    z = Zoo.create(tmp_path / "zoo")
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    real_replace = os.replace

    def replace(src, dst) -> None:
        if Path(dst).name == "registry.json":
            synced.append("REGISTRY")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setattr(os, "replace", replace)
    z.add_task(builtin_tasks["shapes"], train=TrainSettings(epochs=1, batch_size=32))
    before = synced[:synced.index("REGISTRY")]
    for name in ("weights.safetensors", "stats.safetensors", "config.json", ".safetensors", ".json"):
        assert any(p.endswith(name) for p in before), (name, before)
    assert any(p.endswith("router-v1.safetensors") for p in before)


def test_stale_staging_of_dead_writers_is_cleaned_live_kept(zoo):
    dead = zoo / ".staging-999999-dead"
    (dead / "x").mkdir(parents=True)
    (zoo / ".staging-999999-dead.lock").write_text("999999")
    legacy = zoo / ".staging-0123456789abcdef"
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    live, held = leases.new_staging(zoo)
    try:
        Zoo.open(zoo).refresh_router()
        assert not dead.exists() and not legacy.exists() and not (zoo / ".staging-999999-dead.lock").exists()
        assert live.is_dir()
    finally:
        leases.drop_staging(zoo, live, held)
    assert not list(zoo.glob(".staging*"))


# ----- 5. validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"lr": math.nan}, {"lr": math.inf}, {"lr": 0.0}, {"epochs": 0},
                                    {"weight_decay": math.nan}, {"batch_size": 0}, {"head_lr_scale": -math.inf}])
def test_bad_train_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        TrainSettings(**kwargs)


@pytest.mark.parametrize("opts", [{"kl_weight": math.nan}, {"ensemble": math.inf}, {"kl_weight": "NaN"}])
def test_bad_expert_options_are_refused(opts):
    with pytest.raises(ConfigError):
        ExpertOptions.from_dict(opts)
    if not isinstance(next(iter(opts.values())), str):
        with pytest.raises(ConfigError):
            ExpertOptions(**opts)


@pytest.mark.parametrize("extra", [["--lr", "nan"], ["--lr", "inf"], ["--set", "expert.kl_weight=NaN"],
                                   ["--set", "clip-adapter.ratio=Infinity"]])
def test_poisoned_settings_are_one_line_before_any_work(zoo, extra):
    before = snapshot(zoo)
    one_line_error(cli("add-task", "--zoo", str(zoo), "--name", "t", "--data", "builtin:textures", *extra))
    assert snapshot(zoo) == before


def test_registry_is_strict_json(zoo):
    text = (zoo / "registry.json").read_text()
    (zoo / "registry.json").write_text(text.replace('"trainable_share": ', '"trainable_share": NaN, "x": ', 1))
    with pytest.raises(RegistryError, match="NaN"):
        registry.read(zoo)
    reg = json.loads(text)
    reg["experts"]["shapes"]["metrics"]["train_loss"] = math.inf
    with pytest.raises(RegistryError):
        registry.write(zoo, reg)


# ----- 6. a full disk ---------------------------------------------------------------------------------------
def _full_while(monkeypatch, full) -> None:
    real = registry.atomic_write_bytes

    def write(path: Path, data: bytes) -> None:
        if full():
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(registry, "atomic_write_bytes", write)


def test_remove_on_a_full_disk_frees_space_first(zoo, monkeypatch):
    _full_while(monkeypatch, lambda: (zoo / "experts" / "colours").exists())
    out = cli("remove", "--zoo", str(zoo), "--name", "colours")
    assert out.exit_code == 0, out.output
    z = Zoo.open(zoo)
    assert z.names == ["shapes"] and z.verify()["ok"] and not (zoo / "experts" / "colours").exists()


def test_remove_on_a_disk_that_stays_full_is_repaired_later(zoo, monkeypatch):
    _full_while(monkeypatch, lambda: True)
    assert "repair" in one_line_error(cli("remove", "--zoo", str(zoo), "--name", "colours"))
    monkeypatch.undo()
    assert not Zoo.open(zoo).verify()["ok"]  # the registry still names colours, its files are gone
    out = cli("repair", "--zoo", str(zoo), "--yes")
    assert out.exit_code == 0, out.output
    assert Zoo.open(zoo).names == ["shapes"] and Zoo.open(zoo).verify()["ok"]


@pytest.mark.parametrize("where", ["weights", "stats", "router"])
def test_add_task_on_a_full_disk_is_one_line_and_changes_nothing(zoo, monkeypatch, where):
    """Whichever file the disk fills up on (safetensors raises its own error, not an OSError)."""
    import clipzoo.router.lda as lda_mod
    import clipzoo.router.stats as stats_mod
    import clipzoo.zoo.experts.base as base_mod
    from safetensors import SafetensorError

    module = {"weights": base_mod, "stats": stats_mod, "router": lda_mod}[where]

    def full(*a, **k):
        if where == "weights":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(module, "save_file", full)
    before = snapshot(zoo)
    out = cli("add-task", "--zoo", str(zoo), "--name", "textures", "--data", "builtin:textures", "--epochs", "1",
              "--json")
    assert "No space left" in one_line_error(out)
    monkeypatch.undo()
    assert snapshot(zoo) == before and Zoo.open(zoo).verify()["ok"]


from test_hub import built, server  # noqa: E402,F401  (fixtures for the pull cases)
