"""The full-fine-tuning baselines (ft-naive, ft-zscl, clip-cite): they change the towers and the
answers, their distillation terms change training, the frozen backbone never changes, weight
ensembling averages with the previous model, checkpoints round-trip, and the harness runs them."""

from __future__ import annotations

import pytest
import torch

from clipzoo.bench import finetune as FT
from clipzoo.bench import pixels as PX
from clipzoo.bench.harness import BenchSettings, run_benchmark
from clipzoo.bench.methods import FT_METHODS, build, exclude
from clipzoo.tasks.data import load_builtin
from clipzoo.zoo.backbone import load_backbone
from clipzoo.zoo.train import TrainSettings


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs them (and steadier on a shared machine)
    bb = load_backbone()
    seq = [load_builtin(d, n_train=8, n_test=4) for d in ("shapes", "colours", "digits")]
    pix = [PX.task_pixels(t, bb) for t in seq]
    embs = [bb.class_embeddings(t.classes, t.templates) for t in seq]
    texts = [(t.classes, t.templates) for t in seq]
    yield bb, seq, pix, embs, texts
    torch.set_num_threads(threads)


def _make(setup, name: str, **kw):
    bb, seq, _, embs, texts = setup
    s = BenchSettings(ft_steps=kw.pop("steps", 3), ft_lr=kw.pop("lr", 1e-3), **kw)
    torch.manual_seed(0)
    return build([name], embs, bb, TrainSettings(), s, texts, exclude(seq[:1], None))[0]


def _learn(m, pix, tasks=(0,), seed=0):
    for t in tasks:
        torch.manual_seed(seed * 1000 + t)
        m.learn(t, pix[t][0], pix[t][1])
    return m


def _params(m, prefix=""):
    return {n: p.detach().clone() for n, p in m.model.named_parameters() if n.startswith(prefix)}


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_changes_the_image_tower_and_the_answers(setup):
    bb, _, pix, embs, _ = setup
    m = _make(setup, "ft-naive", steps=6)
    before_v, before_t = _params(m, "visual."), _params(m, "transformer.")
    zs_logits = m.embed(pix[0][2]) @ embs[0].T
    torch.manual_seed(0)
    losses = m.learn(0, pix[0][0], pix[0][1])["loss"]  # 40 images: every step sees the same full batch
    assert losses[-1] < losses[0]
    assert _differs(before_v, _params(m, "visual."))
    assert not _differs(before_t, _params(m, "transformer."))  # ft-naive trains the image tower only
    assert m.trainable_params() == sum(p.numel() for p in bb.model.visual.parameters())
    ft_logits = m.embed(pix[0][2]) @ embs[0].T
    assert not torch.allclose(ft_logits, zs_logits, atol=1e-3)
    assert (ft_logits.argmax(1) != zs_logits.argmax(1)).any()  # some answers changed
    # unseen tasks are answered through the fine-tuned tower, so transfer is measured, not copied
    fresh = FT.FineTune(bb, embs, setup[4])
    assert not torch.equal(m.embed(pix[2][2]), fresh.embed(pix[2][2]))


@pytest.mark.parametrize("name", ["ft-zscl", "clip-cite"])
def test_the_distillation_term_changes_training(setup, name):
    """Same seed, same data: the weight-0 variant differs from the weighted one; both train both towers."""
    key = "ft_zscl_weight" if name == "ft-zscl" else "ft_cite_weight"
    runs = {w: _learn(_make(setup, name, ft_avg_every=1, **{key: w}), setup[2]) for w in (0.0, 1.0)}
    assert _differs(_params(runs[0.0]), _params(runs[1.0]))
    start = _params(_make(setup, name))
    assert _differs(_params(runs[1.0], "transformer."), {k: v for k, v in start.items() if k.startswith("transformer.")})
    # and the methods differ from ft-naive on the same seed
    naive = _learn(_make(setup, "ft-naive"), setup[2])
    assert _differs(_params(naive, "visual."), _params(runs[1.0], "visual."))


def test_the_frozen_backbone_is_never_modified(setup):
    bb = setup[0]
    snap = {k: v.clone() for k, v in bb.model.state_dict().items()}
    for name in FT_METHODS:
        m = _learn(_make(setup, name, lr=1e-2), setup[2], tasks=(0, 1))
        assert m.teacher is bb.model and m.model is not bb.model
        assert all(torch.equal(snap[k], v) for k, v in bb.model.state_dict().items()), name
        assert not any(p.requires_grad for p in bb.model.parameters())


def test_zscl_weight_ensembling_averages_with_the_previous_model(setup):
    """avg_every beyond the step budget merges nothing: the model stays the previous one; with
    avg_every = steps the result is exactly (previous + fine-tuned) / 2."""
    pix = setup[2]
    m = _make(setup, "ft-zscl", steps=2, ft_avg_every=3)
    before = _params(m)
    _learn(m, pix)
    assert not _differs(before, _params(m))
    m = _make(setup, "ft-zscl", steps=2, ft_avg_every=2)
    seen = {}
    real = m.after_step

    def grab(k):
        if k == 1:
            seen.update(_params(m))
        real(k)

    m.after_step = grab
    _learn(m, pix)
    after = _params(m)
    assert all(torch.allclose(after[k], (before[k] + seen[k]) / 2, atol=1e-6) for k in after)
    assert m.stored_images() == len(m.ref) > 0 and m.stored_params() > m.trainable_params()


def test_reference_set_stays_outside_the_sequence(setup):
    bb = setup[0]
    px, texts, what = PX.reference_set(bb, {"shapes", "builtin:colours"}, 2)
    assert PX.reference_domains({"shapes", "builtin:colours"}) == ["textures", "digits"]
    assert len(px) == 2 * len(texts) == 2 * 15 and "pretrain" in what and "circle" not in " ".join(texts)
    assert PX.reference_domains(set(PX.synthetic.DOMAINS)) == list(PX.synthetic.DOMAINS)  # nothing left: all
    task = setup[1][0]
    assert PX.task_pixels(task, bb) is PX.task_pixels(task, bb)  # decoded once


@pytest.mark.parametrize("name", FT_METHODS)
def test_state_restore_round_trip(setup, name):
    pix = setup[2]
    a = _learn(_make(setup, name), pix, tasks=(0, 1))
    b = _make(setup, name)
    b.restore(a.state(), [pix[0][:2], pix[1][:2]])
    for t in range(3):
        assert torch.equal(a.embed(pix[t][2]), b.embed(pix[t][2])) and torch.equal(a._weights(t), b._weights(t))
    assert all(torch.equal(u, v) for u, v in zip(a.agnostic(pix[1][2], [0, 1]), b.agnostic(pix[1][2], [0, 1])))
    _learn(a, pix, tasks=(2,))
    _learn(b, pix, tasks=(2,))
    assert not _differs(_params(a), _params(b))
    with pytest.raises(KeyError):
        b.restore({"model.nope": torch.zeros(1)}, [])


def test_harness_runs_tunes_and_counts_the_fine_tuning_baselines(setup):
    seq = setup[1][:2]
    res = run_benchmark(seq, BenchSettings(epochs=1, ft_steps=2, ft_avg_every=2, methods=["zero-shot", *FT_METHODS]))
    b, t = res["baselines"], res["settings"]["tuning"]
    assert {"ft_lr", "ft_zscl_weight", "ft_cite_weight"} <= set(t["chosen"])
    assert res["settings"]["ft_lr"] == t["chosen"]["ft_lr"]
    visual = sum(p.numel() for p in setup[0].model.visual.parameters())
    assert b["ft-naive"]["trainable_params"] == b["ft-naive"]["stored_params"] == visual
    assert b["clip-cite"]["trainable_params"] == setup[0].num_params - 1  # every weight but the logit scale
    assert b["ft-zscl"]["stored_images"] == 10 * sum(len(c) for d, c in PX.synthetic.DOMAINS.items()
                                                     if d not in ("shapes", "colours"))
    assert "pretrain" in b["ft-zscl"]["note"] and b["ft-naive"]["stored_images"] == 0
    for n in FT_METHODS:
        assert len(b[n]["acc_matrix"]) == 2 and b[n]["infer_ms_per_image"] > 0 and b[n]["train_seconds"] > 0


def test_settings_are_checked():
    from clipzoo.errors import ConfigError

    BenchSettings().check()
    for bad in ({"ft_steps": 0}, {"ft_lr": 0.0}, {"ft_cite_weight": -1.0}, {"ft_steps": 4, "ft_avg_every": 5}):
        with pytest.raises(ConfigError, match="ft_"):
            BenchSettings(**bad).check()
