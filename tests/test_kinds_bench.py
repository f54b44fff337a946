"""``clipzoo bench-kinds``: every method trains on the training split less a carved validation split,
rows report validation and test accuracy, and ``--lrs`` chooses each kind's LR on validation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clipzoo.bench import kinds
from clipzoo.cli import main
from clipzoo.errors import ConfigError
from clipzoo.tasks.data import load_builtin
from clipzoo.tasks.validation import DEFAULT_SEED, validation_split
from clipzoo.zoo.train import train_defaults

FAST = {"epochs": 1, "repeats": 1, "batch": 4}


@pytest.fixture(scope="module")
def shapes():
    return load_builtin("shapes", n_train=6, n_test=3)  # 5 classes: 30 training images, 15 test


def test_rows_carry_val_and_test_acc_and_no_model_sees_validation_images(shapes, tmp_path, monkeypatch):
    fitted, encoded = [], []
    real_fit, real_pixels = kinds.fit, kinds._pixels
    monkeypatch.setattr(kinds, "fit", lambda exp, inputs, y, s, **kw: fitted.append(len(y)) or real_fit(
        exp, inputs, y, s, **kw))
    monkeypatch.setattr(kinds, "_pixels", lambda bb, images: encoded.append(list(images)) or real_pixels(bb, images))
    res = kinds.run_kinds_bench([shapes], ["clip-adapter", "lora"], out=tmp_path, echo=lambda line: None,
                                val_fraction=0.34, **FAST)
    train_task, val_task = validation_split(shapes, 0.34, DEFAULT_SEED)
    n_val = len(val_task.test)
    assert n_val == 10 and len(train_task.train) == len(shapes.train) - n_val == 20
    # what the models learn from: the training split less the carved images, nothing else
    assert fitted == [20, 20]
    trained_on, carved = {id(im) for im in encoded[0]}, {id(im) for im in val_task.test.images}
    assert len(encoded[0]) == 20 and not trained_on & carved
    assert trained_on | carved == {id(im) for im in shapes.train.images}
    assert [len(images) for images in encoded] == [20, 10, 15]  # train, validation, test
    assert [r["method"] for r in res["rows"]] == ["zero-shot", "clip-adapter", "lora"]
    for r in res["rows"]:
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert (r["n_train"], r["n_val"], r["n_test"]) == (20, 10, 15)
    assert res["validation"] == {"fraction": 0.34, "seed": DEFAULT_SEED, "split": res["validation"]["split"]}
    assert "lr_choice" not in res
    on_disk = json.loads((tmp_path / "kinds.json").read_text())
    assert on_disk["validation"]["fraction"] == 0.34 and "val_acc" in on_disk["rows"][1]
    md = (tmp_path / "kinds.md").read_text()
    assert "| val acc | test acc |" in md and f"| shapes | lora | {res['rows'][2]['val_acc']:.3f} |" in md


def test_lr_grid_chooses_the_argmax_of_validation_accuracy(shapes, tmp_path):
    grid = [1e-4, 3e-2]
    res = kinds.run_kinds_bench([shapes], ["clip-adapter"], out=tmp_path, echo=lambda line: None, lrs=grid, **FAST)
    runs = [r for r in res["rows"] if r["method"] == "clip-adapter"]
    assert [r["lr"] for r in runs] == grid and all(r["epochs"] == 1 for r in runs)
    (c,) = res["lr_choice"]["per_domain_kind"]
    assert res["lr_choice"]["criterion"] == "validation" and res["train"]["lrs"] == grid
    best = max(r["val_acc"] for r in runs)
    assert c["chosen_val_acc"] == best == next(r["val_acc"] for r in runs if r["lr"] == c["chosen_on_validation"])
    assert c["default_lr"] == train_defaults("clip-adapter")["lr"]
    assert c["chosen_is_default"] is (c["chosen_on_validation"] == c["default_lr"])
    assert "chosen on validation" in (tmp_path / "kinds.md").read_text()


def _row(lr, val, test, default=False):
    return {"domain": "d", "method": "clip-adapter", "lr": lr, "val_acc": val, "test_acc": test,
            "is_default_lr": default}


def test_choice_follows_validation_never_test():
    d = train_defaults("clip-adapter")["lr"]
    rows = [_row(1e-4, 0.5, 0.9), _row(d, 0.6, 0.1, True), _row(1e-2, 0.8, 0.2)]
    (c,) = kinds.choose_lrs(rows, ["clip-adapter"])
    assert c["chosen_on_validation"] == 1e-2 and c["chosen_is_default"] is False and c["chosen_test_acc"] == 0.2
    (c,) = kinds.choose_lrs([_row(1e-4, 0.7, 0.9), _row(d, 0.7, 0.1, True)], ["clip-adapter"])
    assert c["chosen_on_validation"] == d and c["chosen_is_default"] is True  # a tie keeps the default
    (c,) = kinds.choose_lrs([_row(1e-4, 0.7, 0.9), _row(1e-3, 0.7, 0.1)], ["clip-adapter"])
    assert c["chosen_on_validation"] == 1e-4  # else the first given


@pytest.mark.parametrize("args, words", [
    (["--lrs", "1e-3,abc"], "bad --lrs"),
    (["--lrs", "1e-3,1e-3"], "bad --lrs"),
    (["--lrs", "1e-3,-1"], "bad --lrs"),
    (["--lrs", "1e-3", "--lr", "1e-3"], "not both"),
    (["--val-fraction", "1"], "bad --val-fraction"),
])
def test_bad_lr_grid_or_fraction_is_one_line(args, words, tmp_path):
    res = CliRunner().invoke(main, ["bench-kinds", "builtin:shapes", "--out", str(tmp_path), *args])
    assert res.exit_code == 1 and words in res.output and not (tmp_path / "kinds.json").exists()
    with pytest.raises(ConfigError, match="not both"):
        kinds.run_kinds_bench([], ["clip-adapter"], lr=1e-3, lrs=[1e-3])
