"""Push and pull through the real huggingface_hub client, over HTTP, against tests/hub_server.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from conftest import snapshot
from hub_server import HubServer
from clipzoo.zoo import hub, registry
from clipzoo.cli import main
from clipzoo.errors import BackboneError, HubError, IntegrityError
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo

TOKEN = "hf_test_0123456789abcdef"
REPO = "me/zoo"


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A Hub on 127.0.0.1; huggingface_hub configured through its own environment variables."""
    srv = HubServer(TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory, builtin_tasks):
    """A zoo with two experts (shapes, colours) and a lone one with a different 'shapes'."""
    fast = TrainSettings(epochs=5, batch_size=32)
    root = tmp_path_factory.mktemp("built")
    zoo = Zoo.create(root / "zoo")
    for name in ("shapes", "colours"):
        zoo.add_task(builtin_tasks[name], train=fast)
    other = Zoo.create(root / "other")
    other.add_task(builtin_tasks["shapes"], train=TrainSettings(epochs=5, batch_size=32, seed=1))
    return {"zoo": zoo.root, "other": other.root}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_registry(server: HubServer, edit) -> None:
    reg = json.loads(server.files(REPO)["registry.json"])
    edit(reg)
    server.tamper(REPO, "registry.json", json.dumps(reg).encode())


def test_round_trip_gives_identical_predictions(server, built, builtin_tasks, tmp_path):
    zoo = Zoo.open(built["zoo"])
    result = zoo.push_to_hub(REPO, endpoint=server.endpoint)
    assert result["create_repo"] and result["commit"]
    remote = server.files(REPO)
    expected = {"registry.json", "README.md", ".gitattributes"} | set(hub.listed_files(zoo.registry)) | {
        f"experts/{n}/README.md" for n in zoo.names}
    assert set(remote) == expected  # no lock, no staging folders
    weights = "experts/shapes/weights.safetensors"
    assert remote[weights] == (built["zoo"] / weights).read_bytes()

    pulled = Zoo.from_hub(REPO, tmp_path / "new" / "zoo", endpoint=server.endpoint)
    assert pulled.verify()["ok"]
    assert pulled.registry["experts"] == zoo.registry["experts"]
    images = builtin_tasks["shapes"].test.images + builtin_tasks["colours"].test.images
    assert pulled.predict(images) == zoo.predict(images)
    assert not list(pulled.root.glob(".staging*"))
    for card in ["README.md"] + [f"experts/{n}/README.md" for n in zoo.names]:  # the cards come along
        assert (pulled.root / card).read_bytes() == remote[card]


def test_a_card_that_is_not_text_is_dropped_not_installed(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    server.tamper(REPO, "experts/shapes/README.md", b"\xff\xfe not utf-8")
    got = hub.pull(tmp_path / "zoo", REPO, endpoint=server.endpoint)
    assert "experts/shapes/README.md" not in got["cards"] and "experts/colours/README.md" in got["cards"]
    assert not (tmp_path / "zoo" / "experts" / "shapes" / "README.md").exists()
    assert Zoo.open(tmp_path / "zoo").verify()["ok"]


def test_learned_router_travels_with_a_clone_and_is_refreshed_on_merge(server, built, builtin_tasks, tmp_path):
    from clipzoo.router.learned import RouterConfig

    tiny = RouterConfig(hidden=8, pool=64, min_per_task=8, steps=5, cold_steps=10, batch_size=32)
    src = Zoo.open(copy(built["zoo"], tmp_path / "src"))
    router = src.refresh_router(kind="learned", config=tiny)
    hub.push(src.root, REPO, endpoint=server.endpoint)
    assert set(router["files"]) <= set(server.files(REPO))

    clone = Zoo.from_hub(REPO, tmp_path / "clone", endpoint=server.endpoint)
    assert clone.registry["router"] == router and clone.verify()["ok"]
    images = builtin_tasks["shapes"].test.images + builtin_tasks["colours"].test.images
    assert clone.predict(images) == src.predict(images)

    mine = Zoo.open(copy(built["other"], tmp_path / "mine"))
    mine.refresh_router(kind="learned", config=tiny)
    got = hub.pull(mine.root, REPO, only=["colours"], endpoint=server.endpoint)
    assert got["router"] == "refreshed"
    merged = Zoo.open(mine.root)
    assert merged.verify()["ok"] and merged.router().names == ["shapes", "colours"]


def test_model_cards_carry_metadata(server, built):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    reg = registry.read(built["zoo"])
    card = ModelCard(server.files(REPO)["README.md"].decode())
    assert card.data.library_name == "clipzoo"
    assert card.data.experts == ["shapes", "colours"]
    assert card.data.backbone["fingerprint"] == reg["backbone"]["fingerprint"]
    expert = ModelCard(server.files(REPO)["experts/colours/README.md"].decode())
    rec = reg["experts"]["colours"]
    assert expert.data.classes == rec["classes"] and expert.data.training == rec["training"]
    assert expert.data.results == rec["metrics"] and expert.data.sha256 == rec["sha256"]
    assert "clip-adapter" in expert.data.tags
    accs = {r.metric_name: r.metric_value for r in expert.data.eval_results}
    assert accs["test accuracy"] == rec["metrics"]["test_acc"]


def test_own_card_is_kept(server, built, tmp_path):
    root = copy(built["zoo"], tmp_path / "zoo")
    (root / "README.md").write_text("# my own card\n")
    hub.push(root, REPO, endpoint=server.endpoint)
    assert server.files(REPO)["README.md"] == b"# my own card\n"


def test_dry_run_then_push_then_up_to_date(server, built, tmp_path):
    dry = hub.push(built["zoo"], REPO, dry_run=True, endpoint=server.endpoint)
    assert dry["create_repo"] and "registry.json" in dry["changes"]["add"] and dry["commit"] is None
    assert server.repos == {}  # nothing was created

    first = hub.push(built["zoo"], REPO, endpoint=server.endpoint, message="first")
    assert sorted(first["changes"]["add"]) == sorted(dry["changes"]["add"])
    again = hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    assert again["commit"] is None and not (again["changes"]["add"] or again["changes"]["update"])

    root = copy(built["zoo"], tmp_path / "zoo")
    Zoo.open(root).remove("colours")
    plan = hub.push(root, REPO, dry_run=True, endpoint=server.endpoint)
    assert plan["changes"]["update"] == ["README.md", "registry.json"]
    old_router = set(registry.read(built["zoo"])["router"]["files"])
    new_router = set(registry.read(root)["router"]["files"])
    assert new_router and not new_router & old_router  # removing an expert writes a new router version
    assert set(plan["changes"]["add"]) == new_router
    assert set(plan["changes"]["delete"]) == {"experts/colours/README.md"} | old_router | {
        f"experts/colours/{f}" for f in registry.read(built["zoo"])["experts"]["colours"]["files"]}
    hub.push(root, REPO, endpoint=server.endpoint)
    assert not any(p.startswith("experts/colours/") for p in server.files(REPO))
    assert ".gitattributes" in server.files(REPO)  # files outside the zoo are left alone


def test_branch_push_and_pinned_pull(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint, private=True)
    root = copy(built["zoo"], tmp_path / "zoo")
    Zoo.open(root).remove("colours")
    hub.push(root, REPO, revision="dev", endpoint=server.endpoint)
    assert "experts/colours/config.json" in server.files(REPO, "main")
    assert "experts/colours/config.json" not in server.files(REPO, "dev")
    got = hub.pull(tmp_path / "dev", REPO, revision="dev", endpoint=server.endpoint)
    assert got["added"] == ["shapes"] and got["commit"] == server.repos[REPO].branches["dev"]
    with pytest.raises(HubError, match="not found"):  # private: invisible without a token
        hub.pull(tmp_path / "anon", REPO, endpoint=server.endpoint, token=False)
    assert not (tmp_path / "anon").exists()


def test_pull_merges_only_the_named_experts(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    root = Zoo.create(tmp_path / "local").root
    got = hub.pull(root, REPO, only=["colours"], endpoint=server.endpoint)
    assert got["added"] == ["colours"] and Zoo.open(root).names == ["colours"]
    got = hub.pull(root, REPO, endpoint=server.endpoint)
    assert got["added"] == ["shapes"] and got["unchanged"] == ["colours"]
    assert Zoo.open(root).verify()["ok"]
    before = snapshot(root)
    with pytest.raises(HubError, match="no expert 'nope'"):
        hub.pull(root, REPO, only=["nope"], endpoint=server.endpoint)
    assert snapshot(root) == before


def test_conflict_is_refused_unless_forced(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    root = copy(built["other"], tmp_path / "other")
    before = snapshot(root)
    with pytest.raises(HubError, match="conflict: expert 'shapes'.*--force"):
        hub.pull(root, REPO, endpoint=server.endpoint)
    assert snapshot(root) == before
    got = hub.pull(root, REPO, force=True, endpoint=server.endpoint)
    assert got["replaced"] == ["shapes"] and got["added"] == ["colours"]
    z = Zoo.open(root)
    assert z.verify()["ok"]
    assert z.record("shapes")["sha256"] == registry.read(built["zoo"])["experts"]["shapes"]["sha256"]


def test_backbone_mismatch_is_refused(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    rewrite_registry(server, lambda reg: reg["backbone"].update(fingerprint="f" * 64))
    root = copy(built["other"], tmp_path / "other")
    before = snapshot(root)
    with pytest.raises(BackboneError, match="pull into another --zoo"):
        hub.pull(root, REPO, only=["colours"], endpoint=server.endpoint)
    assert snapshot(root) == before
    with pytest.raises(BackboneError, match="another backbone"):  # each expert's config is checked too
        hub.pull(tmp_path / "fresh", REPO, endpoint=server.endpoint)
    assert not (tmp_path / "fresh").exists()


def test_tampered_file_is_rejected(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    path = "experts/colours/weights.safetensors"
    data = bytearray(server.files(REPO)[path])
    data[-1] ^= 1
    server.tamper(REPO, path, bytes(data))
    root = copy(built["other"], tmp_path / "other")
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=f"{path} from the remote does not match its sha256"):
        hub.pull(root, REPO, only=["colours"], endpoint=server.endpoint)
    assert snapshot(root) == before
    with pytest.raises(IntegrityError):
        hub.pull(tmp_path / "fresh", REPO, endpoint=server.endpoint)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("attack", ["tree", "expert-name", "file-name", "pickle"])
def test_unsafe_names_are_refused(server, built, tmp_path, attack):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    if attack == "tree":  # a file listed at ../ by a hostile server
        server.files(REPO)["../evil.json"] = b"{}"
    elif attack == "expert-name":
        rewrite_registry(server, lambda reg: reg["experts"].update({"..": {**reg["experts"]["colours"], "name": ".."}}))
    elif attack == "file-name":
        rewrite_registry(server, lambda reg: reg["experts"]["colours"]["files"].update({"..": "0" * 64}))
    else:
        rewrite_registry(server, lambda reg: reg["experts"]["colours"]["files"].update({"model.pkl": "0" * 64}))
    root = copy(built["other"], tmp_path / "other")
    before = snapshot(root)
    with pytest.raises(HubError, match="refusing"):
        hub.pull(root, REPO, only=["colours"], endpoint=server.endpoint)
    assert snapshot(root) == before
    assert not (tmp_path / "evil.json").exists() and not (root.parent / "evil.json").exists()


def test_network_failure_mid_pull_leaves_zoo_unchanged(server, built, tmp_path):
    hub.push(built["zoo"], REPO, endpoint=server.endpoint)
    server.drop.add("experts/colours/weights.safetensors")
    root = Zoo.create(tmp_path / "local").root
    before = snapshot(root)
    with pytest.raises(HubError, match="pull from me/zoo@main failed"):
        hub.pull(root, REPO, endpoint=server.endpoint)
    assert snapshot(root) == before
    assert any(r.endswith("experts/shapes/weights.safetensors") for r in server.requests)  # it was mid-pull


def test_remote_name_checks():
    for bad in ["../x", "/etc/passwd", "a/../../b", "a\\b", "C:/x", "a//b", "./a"]:
        with pytest.raises(HubError):
            hub.check_remote_name(bad)
    assert hub.check_remote_name(".gitattributes") == ".gitattributes"
    with pytest.raises(HubError):
        hub.safe_path("experts/-x/config.json")
    assert hub.safe_path("experts/mnist_v2/config.json") == "experts/mnist_v2/config.json"


def test_cli_push_pull_and_errors(server, built, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(main, ["push", "--zoo", str(built["zoo"]), REPO, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] and server.repos == {}
    out = runner.invoke(main, ["push", "--zoo", str(built["zoo"]), REPO, "-m", "cli push"])
    assert out.exit_code == 0 and "pushed 2 experts" in out.output
    got = runner.invoke(main, ["pull", REPO, "--zoo", str(tmp_path / "z"), "--only", "shapes", "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["added"] == ["shapes"]

    bad = "hf_wrong_token_must_never_show"
    denied = runner.invoke(main, ["push", "--zoo", str(built["zoo"]), "me/other"], env={"HF_TOKEN": bad})
    assert denied.exit_code == 1 and denied.output.startswith("error: push to me/other@main failed")
    assert bad not in denied.output and TOKEN not in denied.output
    conflict = runner.invoke(main, ["pull", REPO, "--zoo", str(built["other"])])
    assert conflict.exit_code == 1 and "conflict" in conflict.output and "--force" in conflict.output
