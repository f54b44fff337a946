"""Hostile or racing Hubs: every case is refused by ``clipzoo pull`` with one line (or, where the
remote only adds noise, pulled without it) and leaves the local zoo byte-identical."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import snapshot
from hub_server import HubServer
from test_hub import REPO, built, copy, rewrite_registry, server  # noqa: F401  (fixtures)
from clipzoo.cli import main
from clipzoo.errors import BackboneError, ClipzooError, HubError, IntegrityError
from clipzoo.zoo import hub, hub_download, registry

WEIGHTS = "experts/colours/weights.safetensors"


def refused(root: Path, error: type[ClipzooError], match: str) -> None:
    """The API raises ``error`` and ``clipzoo pull`` prints one ``error:`` line with exit 1; ``root``
    (an existing zoo) keeps every byte and no staging folder is left."""
    before = snapshot(root)
    with pytest.raises(error, match=match):
        hub.pull(root, REPO, only=["colours"])
    assert snapshot(root) == before
    out = CliRunner().invoke(main, ["pull", REPO, "--zoo", str(root), "--only", "colours"])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(root) == before and not list(root.glob(".staging*"))


def fresh_refused(tmp_path: Path, error: type[ClipzooError], match: str) -> None:
    """A pull into a new folder is refused and leaves no folder behind."""
    with pytest.raises(error, match=match):
        hub.pull(tmp_path / "fresh", REPO)
    assert not (tmp_path / "fresh").exists()


def replace_file(srv: HubServer, path: str, data: bytes) -> None:
    """Swap an expert's file and its sha256 in the registry (a consistent, hostile commit)."""
    srv.tamper(REPO, path, data)
    _, name, fname = path.split("/")
    rewrite_registry(srv, lambda reg: reg["experts"][name]["files"].update({fname: hashlib.sha256(data).hexdigest()}))


def downloads(srv: HubServer) -> list[str]:
    return [r.split("/resolve/", 1)[1].split("/", 1)[1] for r in srv.requests if "/resolve/" in r]


@pytest.fixture
def pushed(server, built, tmp_path):  # noqa: F811
    """The two-expert zoo on the Hub and a local zoo ('other': another 'shapes') to pull into."""
    hub.push(built["zoo"], REPO)
    return copy(built["other"], tmp_path / "other")


class Endless:
    """1 GiB of zeros, chunk by chunk (re-iterable)."""

    def __iter__(self):
        return iter([b"\0" * 65536] * 16384)


# ----- 1. a file larger than its listing or registry says ---------------------------------------
def test_bigger_file_is_rejected_by_its_sha256(server, pushed, tmp_path):  # noqa: F811
    server.tamper(REPO, WEIGHTS, server.files(REPO)[WEIGHTS] + b"\0" * 4096)
    refused(pushed, IntegrityError, f"{WEIGHTS} from the remote does not match its sha256")
    fresh_refused(tmp_path, IntegrityError, "does not match its sha256")


def test_answer_longer_than_the_listing_is_refused_before_downloading(server, pushed):  # noqa: F811
    server.serve[WEIGHTS] = server.files(REPO)[WEIGHTS] + b"\0" * (1 << 20)
    refused(pushed, IntegrityError, f"{WEIGHTS} from the remote is .* bytes, its listing says .*before downloading")


def test_endless_answer_is_cut_off_at_the_listed_size(server, pushed, tmp_path):  # noqa: F811
    server.serve[WEIGHTS] = Endless()  # chunked: no Content-Length to refuse up front
    refused(pushed, IntegrityError, f"{WEIGHTS} from the remote is larger than the .* download stopped")
    fresh_refused(tmp_path, IntegrityError, "download stopped")
    assert server.sent[WEIGHTS] < 3 * (32 << 20)  # 3 pulls, 1 GiB offered to each: socket buffers at most


def test_listed_size_over_the_limit_is_refused_before_any_expert_download(server, pushed, monkeypatch):  # noqa: F811
    monkeypatch.setitem(hub_download.LIMITS, ".safetensors", 1000)
    assert len(server.files(REPO)[WEIGHTS]) > 1000
    refused(pushed, IntegrityError, r"refusing experts/colours/\S+\.safetensors from the remote: listed at \d+ "
                                    r"bytes, over the limit of 1000 bytes")
    assert downloads(server) == ["registry.json"] * 2  # sizes are checked before anything else is fetched


def test_oversize_card_is_skipped_unread(server, built, tmp_path):  # noqa: F811
    hub.push(built["zoo"], REPO)
    server.tamper(REPO, "experts/shapes/README.md", b"# big\n" * (1 << 18))  # 1.5 MiB
    got = hub.pull(tmp_path / "zoo", REPO)
    assert got["cards"] == ["experts/colours/README.md", "README.md"]
    assert "experts/shapes/README.md" not in downloads(server)
    assert not (tmp_path / "zoo" / "experts" / "shapes" / "README.md").exists()


# ----- 2. links, unlisted files and paths outside the zoo ---------------------------------------
def test_symlink_blob_is_never_written_as_a_link(server, pushed, tmp_path):  # noqa: F811
    server.tamper(REPO, WEIGHTS, b"../../../../../etc/passwd")  # what git stores for a symlink
    refused(pushed, IntegrityError, f"{WEIGHTS} from the remote")
    fresh_refused(tmp_path, IntegrityError, WEIGHTS)
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]


def test_files_no_registry_entry_names_are_ignored(server, pushed, tmp_path):  # noqa: F811
    extras = {"evil.json": b"{}", ".hidden": b"x", "experts/colours/evil.safetensors": b"x",
              "experts/colours/run.py": b"import os", "experts/ghost/config.json": b"{}", "router/extra.json": b"{}",
              "registry.json.bak": b"{}"}
    server.files(REPO).update(extras)
    got = hub.pull(tmp_path / "fresh", REPO)
    reg = registry.read(tmp_path / "fresh")
    expected = {registry.REGISTRY, *hub.listed_files(reg), *got["cards"]}
    assert set(snapshot(tmp_path / "fresh")) == expected
    got = hub.pull(pushed, REPO, only=["colours"])
    assert got["added"] == ["colours"] and not set(snapshot(pushed)) & set(extras)
    assert not set(downloads(server)) & set(extras)
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name or p.name in ("run.py", ".hidden")]


@pytest.mark.parametrize("name", ["/etc/evil.json", "experts/colours/../../../evil.json", "experts\\evil.json",
                                  "C:/evil.json", "experts//evil.json", "./evil.json"])
def test_unsafe_names_in_the_listing_are_refused(server, pushed, tmp_path, name):  # noqa: F811
    server.files(REPO)[name] = b"{}"
    refused(pushed, HubError, "refusing to pull: the remote lists an unsafe file name")
    fresh_refused(tmp_path, HubError, "unsafe file name")
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.parent.glob("evil*"))


def test_registry_file_listed_as_a_directory_is_refused(server, pushed):  # noqa: F811
    data = server.files(REPO).pop(WEIGHTS)
    server.files(REPO)[f"{WEIGHTS}/inner.safetensors"] = data
    refused(pushed, IntegrityError, f"{WEIGHTS} is named by the remote registry but is not a file")


def test_section_named_like_a_zoo_file_is_refused(server, pushed):  # noqa: F811
    rewrite_registry(server, lambda reg: reg.update({"registry.json": {"files": {"registry.json/x.json": "0" * 64}}}))
    refused(pushed, HubError, "section lists files outside its folder")


# ----- 3. a revision that moves during the pull -------------------------------------------------
@pytest.mark.parametrize("when", ["/tree/", "/resolve/", WEIGHTS])
def test_branch_moving_mid_pull_cannot_mix_versions(server, built, tmp_path, when):  # noqa: F811
    hub.push(built["other"], REPO, revision="other")  # another zoo's commit, ready to move main to
    hub.push(built["zoo"], REPO)
    old, old_files = server.repos[REPO].branches["main"], dict(server.files(REPO))

    def move(request: str) -> None:
        if when in request and server.repos[REPO].branches["main"] == old:
            server.commit(REPO, server.files(REPO, "other"))
    server.on_request = move
    got = hub.pull(tmp_path / "zoo", REPO)
    assert server.repos[REPO].branches["main"] != old  # it did move, mid-pull
    assert got["commit"] == old and all(f"/resolve/{old}/" in r for r in server.requests if "/resolve/" in r)
    pulled = snapshot(tmp_path / "zoo")
    for path, data in pulled.items():  # every byte from the old commit (the registry is rewritten locally)
        assert path == registry.REGISTRY or data == old_files[path], path
    assert registry.read(tmp_path / "zoo")["experts"] == json.loads(old_files["registry.json"])["experts"]


def test_server_ignoring_the_pinned_commit_is_refused(server, built, pushed, tmp_path):  # noqa: F811
    hub.push(built["other"], REPO, revision="other")
    old = server.repos[REPO].branches["main"]
    server.unpin = True

    def move(request: str) -> None:  # main gets a new commit before every download
        if "/resolve/" in request:
            server.commit(REPO, server.files(REPO, "other"))
    server.on_request = move
    with pytest.raises(IntegrityError, match=f"served commit .* instead of the pinned {old[:12]}"):
        hub.pull(tmp_path / "fresh", REPO)
    assert not (tmp_path / "fresh").exists()
    refused(pushed, IntegrityError, "instead of the pinned")  # main is 'other' now, still unpinned


# ----- 4. another backbone ----------------------------------------------------------------------
def test_remote_on_another_backbone_is_refused(server, pushed):  # noqa: F811
    rewrite_registry(server, lambda reg: reg["backbone"].update(fingerprint="f" * 64))
    refused(pushed, BackboneError, r"was built on backbone .*ffffffffffff.*pull into another --zoo")


def test_expert_config_naming_another_backbone_is_refused(server, pushed):  # noqa: F811
    path = "experts/colours/config.json"
    cfg = json.loads(server.files(REPO)[path])
    replace_file(server, path, json.dumps({**cfg, "backbone_fingerprint": "e" * 64}).encode())
    refused(pushed, BackboneError, f"{path} from the remote names another backbone")


@pytest.mark.parametrize("backbone", [{"fingerprint": {"x": 1}}, {"fingerprint": "F" * 64},
                                      {"model": "tiny\nerror: forged second line"}, {"model": 7}])
def test_malformed_remote_backbone_is_refused(server, pushed, tmp_path, backbone):  # noqa: F811
    rewrite_registry(server, lambda reg: reg["backbone"].update(backbone))
    refused(pushed, HubError, "refusing the remote registry.*backbone")  # a one-line message, whoever refuses
    fresh_refused(tmp_path, HubError, "refusing the remote registry.*backbone")
