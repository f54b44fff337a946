"""A damaged zoo gets one clear line, never a traceback: each way a zoo on disk can be broken by
hand (registry.json, an expert's files, the lock) is driven through the CLI, which must exit
non-zero with one ``error:`` line and leave every file of the zoo as it was."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import snapshot
from clipzoo.cli import main
from clipzoo.errors import IntegrityError, RegistryError
from clipzoo.zoo import registry

# ----- a small zoo, built once per module and copied per test -------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, builtin_tasks) -> dict[str, Path]:
    """One expert (shapes) on the embedded backbone, and one image to predict."""
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    base = tmp_path_factory.mktemp("damaged")
    z = Zoo.create(base / "zoo")
    z.add_task(builtin_tasks["shapes"], train=TrainSettings(epochs=2, batch_size=32))
    image = base / "shape.png"
    builtin_tasks["shapes"].test.images[0].save(image)
    return {"zoo": z.root, "image": image}


@pytest.fixture
def zoo(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["zoo"], tmp_path / "zoo"))


def edit_registry(root: Path, change: Callable[[dict], None]) -> None:
    """Change registry.json by hand (no validation: this is the damage under test)."""
    reg = json.loads((root / "registry.json").read_text())
    change(reg)
    (root / "registry.json").write_text(json.dumps(reg, indent=2))


def rehash(root: Path, name: str, fname: str) -> None:
    """Record a damaged file's own sha256, as if registry.json had been rewritten over it: the
    file's content, not its hash, is then what must be refused."""
    digest = registry.sha256_file(root / "experts" / name / fname)
    edit_registry(root, lambda reg: reg["experts"][name]["files"].update({fname: digest}))


def run(root: Path, *args: str) -> tuple[int, str]:
    """Invoke the CLI (exceptions propagate: a traceback fails the test); returns (code, output)."""
    res = CliRunner().invoke(main, [args[0], "--zoo", str(root), *args[1:]], catch_exceptions=False)
    return res.exit_code, res.output


def assert_one_line(root: Path, before: dict, *args: str, match: str) -> str:
    code, out = run(root, *args)
    lines = out.strip().splitlines()
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert "Traceback" not in out and match in lines[0], out
    assert snapshot(root) == before
    return lines[0]


# ----- registry.json ---------------------------------------------------------------------------------


def test_registry_that_is_not_utf8(zoo):
    (zoo / "registry.json").write_bytes(b'{"schema_version": 1, "name": "\xff\xfe"}')
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "list", match="is not UTF-8")
    assert "registry.json" in line and "clipzoo pull" in line


def test_registry_that_is_not_an_object(zoo):
    (zoo / "registry.json").write_text("[1, 2]")
    before = snapshot(zoo)
    assert_one_line(zoo, before, "list", match="must be a JSON object")


def test_registry_that_is_not_json(zoo):
    (zoo / "registry.json").write_text('{"schema_version": 1,')
    before = snapshot(zoo)
    assert_one_line(zoo, before, "verify", match="is not valid JSON")


def test_expert_files_of_the_wrong_type(zoo, built):
    edit_registry(zoo, lambda reg: reg["experts"]["shapes"].update(files=["config.json", "weights.safetensors"]))
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "list", match="experts['shapes'].files must be an object")
    assert "registry.json" in line and "clipzoo pull" in line
    assert_one_line(zoo, before, "predict", str(built["image"]), match="experts['shapes'].files")


def test_expert_record_missing_trainable_params(zoo):
    edit_registry(zoo, lambda reg: reg["experts"]["shapes"].pop("trainable_params"))
    before = snapshot(zoo)
    assert_one_line(zoo, before, "list", match="experts['shapes'].trainable_params is missing")
    assert_one_line(zoo, before, "verify", match="trainable_params is missing")


@pytest.mark.parametrize("change, match", [
    (lambda r: r.update(files=dict(list(r["files"].items())[:1])), "router.files must list"),
    (lambda r: r.update(version="2"), "router.version must be a non-negative integer"),
    (lambda r: r.update(version=1.5), "router.version must be a non-negative integer"),
])
def test_router_entry_with_one_file_or_a_bad_version(zoo, change, match):
    edit_registry(zoo, lambda reg: change(reg["router"]))
    before = snapshot(zoo)
    assert_one_line(zoo, before, "list", match=match)


def test_registry_of_a_newer_clipzoo_is_refused(zoo):
    edit_registry(zoo, lambda reg: reg.update(schema_version=registry.SCHEMA_VERSION + 1, experts=[]))
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "list", match="written by a newer clipzoo")
    assert "upgrade" in line


def test_the_repository_example_still_validates():
    from conftest import REPO

    registry.validate(json.loads((REPO / "registry.json").read_text()))
    with pytest.raises(RegistryError, match="sources"):
        reg = json.loads((REPO / "registry.json").read_text())
        reg["experts"]["shapes"]["sources"] = ["nope"]
        registry.validate(reg)


# ----- an expert's folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"),
                                         ('{"kind": "clip-adapter"}', "lacks"),
                                         ("[]", "is not a JSON object")])
def test_expert_config_that_is_damaged(zoo, built, text, match):
    cfg = zoo / "experts" / "shapes" / "config.json"
    cfg.write_text(text)
    before = snapshot(zoo)
    assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]),
                    match="config.json does not match its sha256")
    rehash(zoo, "shapes", "config.json")  # the registry agrees with the damage: the content is refused
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]), match=match)
    assert "expert 'shapes'" in line and "config.json" in line
    code, out = run(zoo, "verify")
    assert code != 0 and "Traceback" not in out and match in out


def test_expert_config_without_backbone_fingerprint(zoo, built):
    cfg_path = zoo / "experts" / "shapes" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["backbone_fingerprint"]
    cfg_path.write_text(json.dumps(cfg))
    rehash(zoo, "shapes", "config.json")
    before = snapshot(zoo)
    assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]),
                    match="config.json lacks backbone_fingerprint")


def test_expert_folder_deleted_by_hand(zoo, built):
    shutil.rmtree(zoo / "experts" / "shapes")
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]),
                           match="expert 'shapes': its folder")
    assert "clipzoo remove" in line
    code, out = run(zoo, "verify")
    assert code != 0 and "shapes/weights.safetensors: missing" in out and "Traceback" not in out


@pytest.mark.parametrize("damage", ["header", "pickle", "flipped-byte", "empty"])
def test_weights_damaged_or_replaced(zoo, built, damage):
    w = zoo / "experts" / "shapes" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "header":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif damage == "pickle":
        data = bytearray(pickle.dumps({"class_emb": [0.0] * 8}))
    elif damage == "flipped-byte":
        data[len(data) // 2] ^= 1
    else:
        data = bytearray()
    w.write_bytes(bytes(data))
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]),
                           match="weights.safetensors does not match its sha256 in registry.json")
    assert "expert 'shapes'" in line and "clipzoo pull" in line
    code, out = run(zoo, "verify")
    assert code != 0 and "shapes/weights.safetensors: sha256 mismatch" in out and "Traceback" not in out
    if damage != "flipped-byte":  # the registry agrees with the damage: safetensors itself refuses it
        rehash(zoo, "shapes", "weights.safetensors")
        before = snapshot(zoo)
        assert_one_line(zoo, before, "predict", "--task", "shapes", str(built["image"]),
                        match="weights.safetensors is not a valid safetensors file")
        code, out = run(zoo, "verify")
        assert code != 0 and "is not a valid safetensors file" in out and "Traceback" not in out


def test_stats_damaged(zoo, built):
    s = zoo / "experts" / "shapes" / "stats.safetensors"
    s.write_bytes(s.read_bytes()[:-3])
    before = snapshot(zoo)
    assert_one_line(zoo, before, "router", "--rebuild", match="stats.safetensors does not match its sha256")
    rehash(zoo, "shapes", "stats.safetensors")
    before = snapshot(zoo)
    assert_one_line(zoo, before, "router", "--rebuild", match="stats.safetensors is not a valid safetensors file")


def test_lock_that_is_a_directory(zoo):
    (zoo / ".lock").unlink()
    (zoo / ".lock").mkdir()
    before = snapshot(zoo)
    line = assert_one_line(zoo, before, "remove", "--name", "shapes", match=".lock is a directory")
    assert "remove it" in line
    assert (zoo / "experts" / "shapes").is_dir()


# ----- integrity before use (the library, below the CLI) ---------------------------------------------


def test_a_flipped_byte_is_refused_before_loading_and_checked_once(zoo, monkeypatch):
    from clipzoo.zoo.zoo import Zoo

    calls: list[Path] = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    Zoo.open(zoo).expert("shapes")
    hashed = len(calls)
    assert hashed >= 2  # config.json and weights.safetensors
    Zoo.open(zoo).expert("shapes")  # a new store, the same process: nothing hashed again
    assert len(calls) == hashed
    w = zoo / "experts" / "shapes" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="expert 'shapes': weights.safetensors does not match its sha256"):
        Zoo.open(zoo).expert("shapes")
    with pytest.raises(IntegrityError, match="stats.safetensors does not match"):
        (zoo / "experts" / "shapes" / "stats.safetensors").write_bytes(b"x")
        Zoo.open(zoo).stats("shapes")
