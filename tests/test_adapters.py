"""Every expert kind and stack through the same checks: a fresh expert is zero-shot CLIP, training
moves it through every module, the backbone and other experts never change, files round-trip,
bad settings fail early, and the default sizes stay under 5% of ViT-B/32."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot
from clipzoo.tasks.data import load_builtin, write_imagefolder
from clipzoo.zoo.adapters import ADAPTERS, AdapterConfig
from clipzoo.zoo.backbone import Backbone, BackboneSpec, fingerprint, load_backbone
from clipzoo.cli import main
from clipzoo.errors import ConfigError
from clipzoo.zoo.experts import build_expert, load_expert, parse_settings
from clipzoo.zoo.train import TrainSettings, fit, param_groups, train_defaults
from clipzoo.zoo.zoo import Zoo

# (stack, settings): each kind alone with defaults, non-default variants, and stacks.
TABLE = [
    ("clip-adapter", {}),
    ("vit-adapter", {}),
    ("vl-adapter", {}),
    ("lora", {}),
    ("prompt", {}),
    ("cross-modal", {}),
    ("lora+prompt", {}),
    ("vit-adapter+clip-adapter", {}),
    ("vit-adapter", {"vit-adapter": {"placement": "mlp", "blocks": [0, 2], "bottleneck": 4}}),
    ("lora", {"lora": {"targets": ["q", "k", "v", "out"], "mlp": True, "rank": 4, "dropout": 0.1}}),
    ("lora", {"lora": {"towers": "text"}}),
    ("prompt", {"prompt": {"class_specific": True, "n_ctx": 6, "init": ""}}),
    ("prompt", {"prompt": {"residual": False}}),
    ("cross-modal", {"cross-modal": {"share": False}}),
    ("vl-adapter+cross-modal", {"expert": {"kl_weight": 1.0, "ensemble": 0.3}}),
]
IDS = [k + ("-" + "-".join(f"{a}" for s in v.values() for a in s) if v else "") for k, v in TABLE]
TRAIN = TrainSettings(epochs=2, batch_size=20)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bb():
    return load_backbone()


@pytest.fixture(scope="module")
def small():
    """Two small built-in tasks (8 training images a class): the checks are about wiring, not accuracy."""
    return {d: load_builtin(d, n_train=8, n_test=4) for d in ("shapes", "colours")}


@pytest.fixture(scope="module")
def shapes(bb, small):
    task = small["shapes"]

    def inputs(split):
        px = torch.stack([bb.preprocess(im.convert("RGB")) for im in split.images])
        return bb.encode_images(px), px, torch.tensor(split.labels)

    return task, inputs(task.train), inputs(task.test)


def _fresh(kind, settings, bb, task, seed=0):
    torch.manual_seed(seed)
    return build_expert(kind, bb, task.classes, task.templates, settings).eval()


@pytest.mark.parametrize("kind,settings", TABLE, ids=IDS)
def test_fresh_expert_is_zero_shot_clip(kind, settings, bb, shapes):
    task, (x, px, _), _ = shapes
    exp = _fresh(kind, settings, bb, task)
    if settings.get("prompt", {}).get("residual") is False:
        pytest.skip("plain CoOp replaces the prompt ensemble by its own prompt")
    with torch.no_grad():
        logits, zs = exp(x, px), exp.zero_shot(x)
    assert zs.abs().max() > 1.0  # a real comparison, not two zero tensors
    torch.testing.assert_close(logits, zs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,settings", TABLE, ids=IDS)
def test_training_moves_every_module_and_nothing_else(kind, settings, bb, shapes):
    task, (x, px, y), _ = shapes
    exp = _fresh(kind, settings, bb, task)
    inputs = (x, px) if exp.needs_pixels else (x,)
    fit(exp, inputs, y, TRAIN, criterion=exp.criterion)
    with torch.no_grad():
        assert (exp(x, px) - exp.zero_shot(x)).abs().max() > 1e-3
    # a module silently bypassed in the forward pass would get no gradient at all
    exp.train()
    exp.criterion(exp(x, px), inputs, y).backward()
    for name, p in exp.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient: bypassed"
    exp.eval()
    assert fingerprint(bb.model_cfg, bb.model) == bb.fingerprint
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    optimised = {id(p) for g in param_groups(exp, TRAIN) for p in g["params"]}
    assert optimised == {id(p) for p in exp.parameters() if p.requires_grad}
    assert not optimised & {id(p) for p in bb.model.parameters()}


@pytest.fixture(scope="module")
def shared_zoo(tmp_path_factory, small):
    """One zoo for the table: a clip-adapter 'colours' expert first, then one expert per row."""
    z = Zoo.create(tmp_path_factory.mktemp("table") / "zoo")
    z.add_task(small["colours"], train=TRAIN)
    return z, snapshot(z.expert_dir("colours"))


@pytest.mark.parametrize("row", range(len(TABLE)), ids=IDS)
def test_zoo_round_trip_and_other_experts_untouched(row, shared_zoo, small, shapes):
    kind, settings = TABLE[row]
    z, colours = shared_zoo
    name = f"shapes-{row}"
    rec = z.add_task(small["shapes"], name=name, kind=kind, settings=settings, train=TRAIN)
    assert snapshot(z.expert_dir("colours")) == colours and z.verify()["ok"]
    assert rec["kind"] == kind and rec["trainable_params"] == z.expert(name).trainable_params()
    task, _, (x, px, _) = shapes
    with torch.no_grad():
        mem = z.expert(name)(x, px)
        disk = load_expert(z.expert_dir(name), z.backbone)(x, px)
    assert torch.equal(mem, disk)


BAD = [
    ("loraa", {}, "unknown expert kind 'loraa'"),
    ("lora+lora", {}, "repeats a kind"),
    ("lora", {"lora": {"rank": 0}}, "rank must be >= 1"),
    ("lora", {"lora": {"rank": "8"}}, "rank must be int"),
    ("lora", {"lora": {"rnk": 8}}, "unknown setting"),
    ("lora", {"lora": {"targets": ["q", "x"]}}, "targets must be"),
    ("lora", {"lora": {"towers": "audio"}}, "towers must be"),
    ("lora", {"prompt": {"n_ctx": 2}}, "not in the stack"),
    ("vit-adapter", {"vit-adapter": {"blocks": [3]}}, "block index 3 out of range"),
    ("vl-adapter", {"vl-adapter": {"blocks": [-1]}}, "out of range"),
    ("vit-adapter", {"vit-adapter": {"placement": "before"}}, "placement must be"),
    ("vit-adapter", {"vit-adapter": {"bottleneck": 0}}, "bottleneck must be"),
    ("prompt", {"prompt": {"n_ctx": 2}}, "more than n_ctx=2"),
    ("prompt", {"prompt": {"n_ctx": 40}}, "n_ctx must be in"),
    ("cross-modal", {"cross-modal": {"reduction": 0}}, "reduction must be"),
    ("clip-adapter", {"expert": {"ensemble": 2}}, "ensemble in"),
]


@pytest.mark.parametrize("kind,settings,message", BAD, ids=[b[2] for b in BAD])
def test_bad_settings_fail_before_training(kind, settings, message, empty_zoo, small, monkeypatch):
    import clipzoo.zoo.learn as zoo_mod

    def no_training(*a, **k):
        raise AssertionError("training started despite bad settings")

    monkeypatch.setattr(zoo_mod, "fit", no_training)
    before = snapshot(empty_zoo.root)
    with pytest.raises(ConfigError, match=message):
        empty_zoo.add_task(small["shapes"], kind=kind, settings=settings)
    assert snapshot(empty_zoo.root) == before


def test_resnet_backbone_cannot_host_in_encoder_kinds():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=8)
    text = CLIPTextCfg(context_length=77, width=16, heads=2, layers=1)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    cfg = {"embed_dim": 16, "vision_cfg": vision.__dict__, "text_cfg": text.__dict__}
    rn = Backbone(BackboneSpec("RN50", "random-init"), model, cfg)
    for kind in ("vit-adapter", "vl-adapter", "lora", "lora+prompt"):
        with pytest.raises(ConfigError, match="ModifiedResNet image tower, not a vision transformer"):
            build_expert(kind, rn, ["cat", "dog"], ["a {}."])
    for kind, settings in (("lora", {"lora": {"towers": "text"}}), ("prompt", {}), ("cross-modal", {})):
        assert not build_expert(kind, rn, ["cat", "dog"], ["a {}."], settings).needs_pixels


def test_lora_matches_merged_weights_reference(bb, shapes):
    """LoRA on q and v equals open_clip's own forward with ``W + (alpha/r) B A`` merged into the
    q and v slices of each fused ``in_proj_weight`` (the reference implementation)."""
    import copy

    task, (x, px, _), _ = shapes
    exp = _fresh("lora", {"lora": {"targets": ["q", "v"], "rank": 4, "alpha": 8.0}}, bb, task)
    ref = copy.deepcopy(bb.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, site in exp.stack[0].sites.items():
            tower, i, _ = key.split("_", 2)
            blocks = ref.visual.transformer.resblocks if tower == "image" else ref.transformer.resblocks
            w = blocks[int(i)].attn.in_proj_weight
            W = w.shape[1]
            for slot, part in (("q", 0), ("v", 2)):
                lr = site.parts[slot]
                lr.B.copy_(torch.randn(lr.B.shape, generator=g) * 0.05)
                w[part * W:(part + 1) * W] += lr.scale * lr.B @ lr.A
        expected_img = torch.nn.functional.normalize(ref.encode_image(px), dim=-1)
        names = [c.replace("_", " ") for c in task.classes]
        txt = ref.encode_text(bb.tokenizer([t.format(c) for c in names for t in task.templates]))
        txt = torch.nn.functional.normalize(txt, dim=-1).view(len(names), len(task.templates), -1).mean(1)
        torch.testing.assert_close(exp.adapted_features(x, px), expected_img, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(exp.class_weights(), torch.nn.functional.normalize(txt, dim=-1), atol=1e-5, rtol=1e-4)
        assert (exp.adapted_features(x, px) - x).abs().max() > 1e-2  # the merged weights really differ


def test_pixel_experts_refuse_features_only(bb, shapes):
    task, (x, _, _), _ = shapes
    with pytest.raises(ConfigError, match="needs pixels"):
        _fresh("lora", {}, bb, task)(x)
    assert not _fresh("lora", {"lora": {"towers": "text"}}, bb, task).needs_pixels


def test_ensemble_mixes_zero_shot_logits(bb, shapes):
    task, (x, px, y), _ = shapes
    plain = _fresh("cross-modal", {}, bb, task)
    mixed = _fresh("cross-modal", {"expert": {"ensemble": 0.25}}, bb, task)
    fit(plain, (x,), y, TRAIN)
    mixed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        expected = 0.75 * plain(x) + 0.25 * plain.zero_shot(x)
        torch.testing.assert_close(mixed(x), expected)


def test_kl_term_keeps_the_adapted_distribution_near_zero_shot(bb, shapes):
    task, (x, px, y), _ = shapes

    def kl_after(weight):
        exp = _fresh("clip-adapter", {"expert": {"kl_weight": weight}}, bb, task)
        fit(exp, (x,), y, TrainSettings(epochs=10, batch_size=32), criterion=exp.criterion)
        with torch.no_grad():
            p, q = exp.zero_shot(x).log_softmax(1), exp(x).log_softmax(1)
            return torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()

    assert kl_after(5.0) < kl_after(0.0)


def test_settings_parse_and_unknown_saved_keys_only_warn():
    assert parse_settings(["lora.rank=4", 'lora.targets=["q","v"]', "prompt.init=a photo of",
                           "expert.ensemble=0.5"]) == {
        "lora": {"rank": 4, "targets": ["q", "v"]}, "prompt": {"init": "a photo of"}, "expert": {"ensemble": 0.5}}
    with pytest.raises(ConfigError, match="KIND.KEY=VALUE"):
        parse_settings(["rank=4"])
    with pytest.warns(UserWarning, match="ignoring unknown settings"):
        ADAPTERS["lora"][0].from_dict({"kind": "lora", "rank": 4, "from_the_future": 1})
    assert issubclass(ADAPTERS["lora"][0], AdapterConfig)


def test_in_encoder_kinds_default_to_fewer_epochs_at_a_higher_lr():
    base = {"epochs": TrainSettings.epochs, "lr": TrainSettings.lr}
    assert train_defaults("prompt+cross-modal") == base
    assert train_defaults("clip-adapter") == {"epochs": TrainSettings.epochs, "lr": 5e-3}  # chosen on validation
    assert train_defaults("vit-adapter+clip-adapter") == {"epochs": 10, "lr": 5e-3}
    assert train_defaults("lora+prompt") == train_defaults("vl-adapter") == {"epochs": 10, "lr": 5e-3}
    assert train_defaults("fusion") == base  # a kind outside the adapter registry


@pytest.fixture(scope="module")
def vit_b32():
    """ViT-B/32's architecture with random weights (nothing is downloaded)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    return Backbone(BackboneSpec("ViT-B-32", "random-init"), model, open_clip.get_model_config("ViT-B-32"))


@pytest.mark.parametrize("kind", [k for k in ADAPTERS] + ["lora+prompt", "vit-adapter+clip-adapter"])
def test_default_experts_are_under_5_percent_of_vit_b32(kind, vit_b32):
    classes = [f"class {i}" for i in range(10)]
    exp = build_expert(kind, vit_b32, classes, ["a photo of a {}."])
    share = exp.trainable_params() / vit_b32.num_params
    assert 0 < share < 0.05, f"{kind}: {exp.trainable_params():,} params = {share:.2%}"


def test_cli_add_task_stacks_predict_and_verify(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        res = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == code, res.output
        return res.output

    zoo = tmp_path / "zoo"
    run("init", "--zoo", zoo)
    run("add-task", "--zoo", zoo, "--name", "shapes", "--data", "builtin:shapes", "--kind", "lora+prompt",
        "--epochs", 1, "--set", "lora.rank=4", "--set", "expert.kl_weight=0.5", "--json")
    run("add-task", "--zoo", zoo, "--name", "digits", "--data", "builtin:digits", "--kind", "vit-adapter",
        "--epochs", 1, "--json")
    bad = runner.invoke(main, ["add-task", "--zoo", str(zoo), "--name", "x", "--data", "builtin:colours",
                               "--kind", "lora", "--set", "lora.rank=0"])
    assert bad.exit_code == 1 and "error: lora rank must be >= 1" in bad.output
    listed = {r["name"]: r for r in json.loads(run("list", "--zoo", zoo, "--json"))}
    assert listed["shapes"]["kind"] == "lora+prompt" and listed["digits"]["kind"] == "vit-adapter"
    assert listed["shapes"]["training"]["settings"] == {"lora": {"rank": 4}, "expert": {"kl_weight": 0.5}}
    assert all(0 < r["trainable_params"] and 0 < r["trainable_share"] < 1 for r in listed.values())
    assert json.loads((zoo / "experts" / "shapes" / "config.json").read_text())["options"]["kl_weight"] == 0.5
    images = tmp_path / "images"
    for d in ("shapes", "digits"):
        write_imagefolder(load_builtin(d, n_train=0, n_test=4), images / d)
    preds = json.loads(run("predict", "--zoo", zoo, "--json", images / "shapes" / "test", images / "digits" / "test"))
    assert {"shapes", "digits"} <= {p["task"] for p in preds}  # one batch, routed to both experts
    routed_right = sum(Path(p["path"]).parts[-4] == p["task"] for p in preds) / len(preds)
    assert routed_right > 0.7
    assert json.loads(run("verify", "--zoo", zoo, "--json"))["ok"]
    z = Zoo.open(zoo)
    assert z.expert("digits").needs_pixels and z.expert("shapes").needs_pixels
    _fused_modes_share_one_tower_pass(z, sorted((images / "shapes" / "test").rglob("*.png"))
                                      + sorted((images / "digits" / "test").rglob("*.png")))


def _fused_modes_share_one_tower_pass(z, images):
    """predict --mode avg over two in-encoder candidates: one image-tower pass serves every
    candidate's rows, with the answers of each expert running its own tower."""
    import clipzoo.zoo.experts.stack as stack_mod
    import clipzoo.zoo.predict as predict_mod
    from clipzoo.router.fusion import average_predict

    feats, px = z.features(images), z.pixels(images)
    pix = lambda idx: px[list(idx)]  # noqa: E731
    r = z.route(feats, 2)
    experts = {e: z.expert(r.names[e]) for e in r.indices.unique().tolist()}
    alone = average_predict(experts, r.names, r.indices, feats, pix)  # each expert its own tower pass
    calls = {"shared": 0, "own": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    real = (predict_mod.encode_image, stack_mod.encode_image)
    predict_mod.encode_image, stack_mod.encode_image = counting("shared", real[0]), counting("own", real[1])
    try:
        preds = z.predict_features(feats, top_k=2, pixels=pix, mode="avg", fallback=False)
    finally:
        predict_mod.encode_image, stack_mod.encode_image = real
    assert calls == {"shared": 1, "own": 0}
    rows = torch.arange(len(feats))
    chosen = r.indices[rows, alone["slot"]].tolist()
    assert [p["task"] for p in preds] == [r.names[e] for e in chosen]
    assert [p["label"] for p in preds] == [experts[e].classes[int(c)] for e, c in zip(chosen, alone["label"])]
    torch.testing.assert_close(torch.tensor([p["score"] for p in preds]), alone["score"].float(), atol=1e-4, rtol=1e-4)


def test_bench_kinds_reports_every_method_measured_in_one_run(tmp_path):
    out = tmp_path / "kinds"
    r = CliRunner().invoke(main, ["bench-kinds", "builtin:shapes", "--methods", "clip-adapter,lora+prompt",
                                  "--epochs", "1", "--repeats", "1", "--batch", "8", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert [row["method"] for row in res["rows"]] == ["zero-shot", "clip-adapter", "lora+prompt"]
    zs, ca, lp = res["rows"]
    assert zs["trainable_params"] == 0 and 0 < ca["trainable_params"] < lp["trainable_params"]
    assert all(0 <= row["test_acc"] <= 1 and row["ms_per_image"] > 0 for row in res["rows"])
    assert res["machine"]["cpus"] >= 1 and json.loads((out / "kinds.json").read_text())["rows"] == res["rows"]
    assert "| shapes | lora+prompt |" in (out / "kinds.md").read_text()
    bad = CliRunner().invoke(main, ["bench-kinds", "builtin:shapes", "--methods", "lora+nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown expert kind 'nope'" in bad.output and not (tmp_path / "x").exists()


def _perturbed(kind, settings, bb, task, seed):
    """A fresh expert whose zero-initialised outputs are made non-zero (so experts differ)."""
    exp = _fresh(kind, settings, bb, task, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in exp.stack.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return exp


def test_one_tower_pass_serves_rows_of_different_experts(bb, shapes):
    """RowHooks: a batch whose rows belong to different in-encoder experts (vit-adapter, lora, a
    stack), run once through the image tower, gives each row what its own expert gives alone;
    rows of no expert get the frozen embedding."""
    from clipzoo.zoo.encoders import Hooks, RowHooks, encode_image

    task, (x, px, _), _ = shapes
    experts = [_perturbed(k, s, bb, task, i) for i, (k, s) in enumerate(
        [("vit-adapter", {}), ("lora", {}), ("vit-adapter+clip-adapter", {"vit-adapter": {"placement": "mlp"}})])]
    rows = [torch.tensor([0, 3, 5]), torch.tensor([1, 4]), torch.tensor([2, 6, 7])]
    with torch.no_grad():
        mixed = encode_image(bb.model, px[:9], RowHooks([(r, e.encoder_hooks()) for r, e in zip(rows, experts)]))
        for r, e in zip(rows, experts):
            alone = encode_image(bb.model, px[r], e.hooks)
            torch.testing.assert_close(mixed[r], alone, atol=1e-5, rtol=1e-4)
            assert (alone - x[r]).abs().max() > 1e-3  # the experts really change the tower
            torch.testing.assert_close(e(x[r], encoded=mixed[r]), e(x[r], px[r]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mixed[8:], encode_image(bb.model, px[8:9], Hooks()), atol=1e-5, rtol=1e-4)
    assert _fresh("clip-adapter", {}, bb, task).encoder_hooks() is None


@pytest.mark.parametrize("kind,settings", [
    ("clip-adapter", {}), ("cross-modal", {"cross-modal": {"share": False}}), ("prompt", {}),
    ("lora", {"lora": {"towers": "text"}}), ("clip-adapter+cross-modal", {"expert": {"ensemble": 0.3}})])
def test_experts_of_one_config_run_as_one_grouped_call(kind, settings, bb, small, shapes):
    """Experts with one config (different weights and class counts) share a group key and give,
    in one grouped call on padded rows, what each gives alone; classes past an expert's own are
    -inf. In-encoder experts and other configs do not share the key."""
    from clipzoo.router.groups import Groups

    task, (x, _, _), _ = shapes
    tasks = [task, small["colours"], task]
    experts = [_perturbed(kind, settings, bb, t, seed) for seed, t in enumerate(tasks)]
    assert experts[0].group_key() is not None and len({e.group_key() for e in experts}) == 1
    assert _fresh("clip-adapter", {"clip-adapter": {"ratio": 0.2}}, bb, task).group_key() != \
        _fresh("clip-adapter", {}, bb, task).group_key()
    assert _fresh("vit-adapter", {}, bb, task).group_key() is None
    g = Groups.of(torch.tensor([0, 1, 1, 2, 0, 1, 0]))
    with torch.no_grad():
        out = type(experts[0]).grouped_logits([experts[o] for o in g.owners.tolist()], g.pad(x[:7]))
        for j, e in enumerate(experts):
            rows = g.rows[g.group == j]
            alone = e(x[rows])
            torch.testing.assert_close(out[j, :len(rows), :len(e.classes)], alone, atol=1e-4, rtol=1e-4)
            assert torch.isinf(out[j, :, len(e.classes):]).all()
    assert len({len(t.classes) for t in tasks}) > 1
