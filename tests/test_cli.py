"""The CLI contract (scripts depend on it), driven with click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clipzoo.cli import main


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args, ok=True):
        res = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res

    return invoke


@pytest.fixture
def cli_zoo(tmp_path, run, builtin_tasks):
    from clipzoo.tasks.data import write_imagefolder

    zoo = tmp_path / "zoo"
    run("init", "--zoo", zoo)
    for d in ("shapes", "digits"):
        src = write_imagefolder(builtin_tasks[d], tmp_path / "data" / d)
        run("add-task", "--zoo", zoo, "--name", d, "--data", src, "--epochs", 3, "--json")
    return zoo, tmp_path / "data"


def test_list_predict_evaluate_json(cli_zoo, run):
    zoo, data = cli_zoo
    listed = json.loads(run("list", "--zoo", zoo, "--json").output)
    assert [e["name"] for e in listed] == ["shapes", "digits"]
    for e in listed:
        assert {"name", "kind", "classes", "trainable_params", "trainable_share", "sha256"} <= set(e)
    preds = json.loads(run("predict", "--zoo", zoo, "--top-k", "2", "--json", data / "digits" / "test").output)
    assert len(preds) == 80
    assert {"path", "task", "label", "score", "routing"} <= set(preds[0])
    assert sum(p["task"] == "digits" for p in preds) / len(preds) > 0.9
    ev = json.loads(run("evaluate", "--zoo", zoo, "--data", data / "shapes", "--json").output)
    assert 0 <= ev["accuracy"] <= 1 and ev["n"] == 40 and ev["task_ids"] == "routed"
    assert set(ev["per_class"]) == {"circle", "cross", "square", "star", "triangle"}
    given = json.loads(run("evaluate", "--zoo", zoo, "--data", data / "shapes", "--task", "shapes", "--json").output)
    assert given["task_ids"] == "given"


def test_verify_and_remove(cli_zoo, run):
    zoo, _ = cli_zoo
    assert json.loads(run("verify", "--zoo", zoo, "--json").output)["ok"] is True
    w = zoo / "experts" / "digits" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    res = run("verify", "--zoo", zoo, ok=False)
    assert res.exit_code == 1 and "digits/weights.safetensors" in res.output
    run("remove", "--zoo", zoo, "--name", "digits")
    assert json.loads(run("verify", "--zoo", zoo, "--json").output)["ok"] is True


@pytest.mark.parametrize("args, words", [
    (["list", "--zoo", "{tmp}/none"], "no zoo at"),
    (["add-task", "--zoo", "{zoo}", "--name", "shapes", "--data", "builtin:shapes"], "already exists"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--kind", "nope"], "unknown expert kind"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "{tmp}/missing"], "data directory not found"),
    (["predict", "--zoo", "{zoo}", "{tmp}/missing.png"], "no such image"),
    (["init", "--zoo", "{zoo}"], "already exists"),
    (["init", "--zoo", "{tmp}/z2", "--backbone", "ViT-B-32"], "no pretrained weights named"),
])
def test_errors_are_one_line_and_nonzero(cli_zoo, run, tmp_path, args, words):
    zoo, _ = cli_zoo
    res = run(*[a.format(zoo=zoo, tmp=tmp_path) for a in args], ok=False)
    assert res.exit_code == 1
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


def test_help_has_examples(run):
    for cmd in ("init", "add-task", "predict", "bench"):
        assert "Example" in run(cmd, "--help").output
