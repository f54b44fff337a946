"""The zoo: adding tasks never changes old experts, writes are atomic, routing picks the task."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from conftest import snapshot
from clipzoo.tasks.data import load_builtin
from clipzoo.zoo import registry
from clipzoo.errors import BackboneError, DataError, RegistryError
from clipzoo.zoo.train import TrainSettings
from clipzoo.zoo.zoo import Zoo


def test_add_tasks_keeps_old_experts_byte_identical(empty_zoo, builtin_tasks, fast_train):
    z = empty_zoo
    z.add_task(builtin_tasks["shapes"], train=fast_train)
    first = snapshot(z.expert_dir("shapes"))
    sha = z.record("shapes")["sha256"]
    for d in ("colours", "textures"):
        z.add_task(builtin_tasks[d], train=fast_train)
    assert snapshot(z.expert_dir("shapes")) == first
    assert Zoo.open(z.root).record("shapes")["sha256"] == sha
    assert z.verify()["ok"]


def test_records_carry_the_registry_schema(empty_zoo, builtin_tasks, fast_train):
    rec = empty_zoo.add_task(builtin_tasks["digits"], train=fast_train)
    assert set(registry.EXPERT_KEYS) <= set(rec)
    assert rec["kind"] == "clip-adapter" and rec["classes"][0] == "zero"
    assert 0 < rec["trainable_share"] < 0.05
    assert rec["trainable_params"] == sum(p.numel() for p in empty_zoo.expert("digits").parameters() if p.requires_grad)
    assert 0.0 <= rec["metrics"]["test_acc"] <= 1.0
    registry.validate(json.loads((empty_zoo.root / "registry.json").read_text()))


def test_verify_detects_a_flipped_byte(empty_zoo, builtin_tasks, fast_train):
    empty_zoo.add_task(builtin_tasks["shapes"], train=fast_train)
    w = empty_zoo.expert_dir("shapes") / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    rep = empty_zoo.verify()
    assert not rep["ok"] and rep["problems"] == ["shapes/weights.safetensors: sha256 mismatch"]


def test_failed_add_task_leaves_zoo_unchanged(empty_zoo, builtin_tasks, fast_train, monkeypatch, tmp_path):
    z = empty_zoo
    z.add_task(builtin_tasks["shapes"], train=fast_train)
    before = snapshot(z.root)
    with pytest.raises(RegistryError, match="already exists"):
        z.add_task(builtin_tasks["shapes"], train=fast_train)
    with pytest.raises(DataError):
        z.add_task(tmp_path / "missing", name="x", train=fast_train)

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut during the registry write")

    monkeypatch.setattr(registry, "atomic_write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        z.add_task(builtin_tasks["colours"], train=fast_train)
    assert snapshot(z.root) == before
    assert Zoo.open(z.root).names == ["shapes"]


def _add(args):
    root, domain = args
    z = Zoo.open(root)
    z.add_task(load_builtin(domain, 12, 4), train=TrainSettings(epochs=2))
    return domain


def test_concurrent_add_task_loses_nothing(empty_zoo):
    with mp.get_context("spawn").Pool(2) as pool:
        done = pool.map(_add, [(str(empty_zoo.root), "shapes"), (str(empty_zoo.root), "digits")])
    z = Zoo.open(empty_zoo.root)
    assert sorted(z.names) == sorted(done) == ["digits", "shapes"]
    assert z.verify()["ok"]


def test_predict_routes_mixed_inputs_and_remove(empty_zoo, builtin_tasks, fast_train):
    z = empty_zoo
    for d, td in builtin_tasks.items():
        z.add_task(td, train=fast_train)
    images, truth = [], []
    for d, td in builtin_tasks.items():
        images += td.test.images
        truth += [d] * len(td.test)
    preds = z.predict(images, top_k=2)
    assert sum(p["task"] == t for p, t in zip(preds, truth)) / len(truth) > 0.9
    assert all(len(p["routing"]) == 2 and abs(sum(p["routing"].values()) - 1) < 1e-4 for p in preds)
    assert {"path", "task", "label", "score", "routing"} <= set(preds[0])
    given = z.predict(images[:3], task="digits")
    assert all(p["task"] == "digits" for p in given)
    z.remove("digits")
    assert "digits" not in Zoo.open(z.root).names and not z.expert_dir("digits").exists()
    with pytest.raises(RegistryError, match="no expert named"):
        z.predict(images[:1], task="digits")


def test_feature_cache_encodes_each_image_once(empty_zoo, builtin_tasks, tmp_path, monkeypatch):
    z = empty_zoo
    monkeypatch.setenv("CLIPZOO_CACHE", str(tmp_path / "fresh-cache"))
    calls = []
    bb = z.backbone
    original = bb.encode_images

    def counting(pixels):
        calls.append(len(pixels))
        return original(pixels)

    bb.encode_images = counting
    try:
        imgs = builtin_tasks["colours"].test.images
        a = z.features(imgs)
        b = z.features(imgs)
    finally:
        del bb.encode_images
    assert sum(calls) == len(imgs)
    assert torch.equal(a, b)
    assert torch.equal(Zoo.open(z.root).features(imgs), a)


def test_expert_on_another_backbone_is_refused(empty_zoo, builtin_tasks, fast_train, tmp_path):
    from safetensors.torch import load_file, save_file
    from clipzoo.zoo.backbone import EMBEDDED_WEIGHTS, BackboneSpec

    empty_zoo.add_task(builtin_tasks["shapes"], train=fast_train)
    sd = load_file(str(EMBEDDED_WEIGHTS))
    sd["logit_scale"] = sd["logit_scale"] + 0.25
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    z2 = Zoo.create(tmp_path / "z2", BackboneSpec("clipzoo-tiny", str(other)))
    from clipzoo.zoo.experts import load_expert

    with pytest.raises(BackboneError, match="trained on backbone"):
        load_expert(empty_zoo.expert_dir("shapes"), z2.backbone)


def test_create_refuses_existing_zoo(empty_zoo):
    with pytest.raises(RegistryError, match="already exists"):
        Zoo.create(empty_zoo.root)
    with pytest.raises(RegistryError, match="no zoo at"):
        Zoo.open(empty_zoo.root / "nothing")


def test_root_registry_json_is_a_valid_current_example():
    """The repository's registry.json documents the schema: it validates, its backbone is the
    embedded one as packaged now, and every expert's kind is one clipzoo can load."""
    from conftest import REPO
    from clipzoo.zoo.adapters import parse_kinds
    from clipzoo.zoo.backbone import BackboneSpec, load_backbone

    reg = registry.validate(json.loads((REPO / "registry.json").read_text()))
    assert reg["backbone"]["fingerprint"] == load_backbone(BackboneSpec()).fingerprint
    assert reg["experts"] and all(parse_kinds(r["kind"]) for r in reg["experts"].values())
    assert all(f.startswith("router/") for f in reg["router"]["files"])


@pytest.mark.parametrize("router, msg", [
    ({"kind": "learned", "version": 1}, "needs 'kind', 'version' and 'files'"),
    ({"kind": "learned", "version": 1, "files": {"../x.safetensors": "0" * 64}}, "bad file entry"),
    ({"kind": "learned", "version": 1, "files": {"router/x.json": "abc"}}, "bad file entry"),
])
def test_registry_rejects_a_bad_router_entry(router, msg):
    reg = {"schema_version": registry.SCHEMA_VERSION, "backbone": {"model": "m", "fingerprint": "f"},
           "experts": {}, "router": router}
    with pytest.raises(RegistryError, match=msg):
        registry.validate(reg)


def test_predict_refuses_an_empty_zoo_or_unknown_task_before_encoding(empty_zoo, builtin_tasks, fast_train, monkeypatch):
    images = builtin_tasks["shapes"].test.images[:2]
    monkeypatch.setattr(Zoo, "features", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(RegistryError, match="no experts yet"):
        empty_zoo.predict(images)
    monkeypatch.undo()
    empty_zoo.add_task(builtin_tasks["shapes"], train=fast_train)
    monkeypatch.setattr(Zoo, "features", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(RegistryError, match="no expert named 'nope'.*experts: shapes"):
        empty_zoo.predict(images, task="nope")
