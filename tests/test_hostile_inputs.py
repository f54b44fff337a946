"""Hostile inputs: decompression bombs, truncated files and non-images are refused with one line
naming the file; `predict` still answers the other images; arguments are checked before any model."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, snapshot
from clipzoo.cli import main
from clipzoo.errors import ConfigError, DataError
from clipzoo.tasks.data import check_image, open_image, write_imagefolder

BOMB_SIDE = 14_000


def write_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (196 million for 14000)."""
    Image.new("1", (1, 1)).save(path)
    buf = bytearray(path.read_bytes())
    assert buf[12:16] == b"IHDR"
    buf[16:24] = struct.pack(">II", side, side)
    buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])))
    path.write_bytes(bytes(buf))
    return path


def write_truncated(path: Path) -> Path:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixel data does not
    return path


def write_text(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


def one_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, builtin_tasks) -> Path:
    root = tmp_path_factory.mktemp("data")
    for d in ("shapes", "digits"):
        write_imagefolder(builtin_tasks[d], root / d)
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, data) -> Path:
    """A zoo with a 'shapes' expert, built through the CLI."""
    root = tmp_path_factory.mktemp("z") / "zoo"
    runner = CliRunner()
    for args in (["init", "--zoo", root],
                 ["add-task", "--zoo", root, "--name", "shapes", "--data", data / "shapes", "--epochs", 3]):
        res = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return root


# ----- the checks themselves ---------------------------------------------------------------------
def test_open_image_refuses_each_kind_with_the_file_named(tmp_path):
    cases = {write_bomb(tmp_path / "bomb.png"): "decompression bomb",
             write_bomb(tmp_path / "smaller.png", 7_000): "49,000,000 pixels, over the limit of 40,000,000",
             write_truncated(tmp_path / "cut.png"): "truncated",
             write_text(tmp_path / "x.png"): "not an image"}
    for path, words in cases.items():
        with pytest.raises(DataError, match=words) as e:
            open_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert check_image(tmp_path / "cut.png") == (32, 32)  # the header is fine: only decoding finds it


def test_limits_follow_the_environment(tmp_path, monkeypatch):
    img = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(img)
    assert open_image(img).size == (10, 10)
    monkeypatch.setenv("CLIPZOO_MAX_IMAGE_PIXELS", "99")
    with pytest.raises(DataError, match="CLIPZOO_MAX_IMAGE_PIXELS"):
        open_image(img)
    monkeypatch.setenv("CLIPZOO_MAX_IMAGE_PIXELS", "100")
    monkeypatch.setenv("CLIPZOO_MAX_IMAGE_BYTES", "10")
    with pytest.raises(DataError, match="CLIPZOO_MAX_IMAGE_BYTES"):
        open_image(img)
    monkeypatch.setenv("CLIPZOO_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(ConfigError, match="CLIPZOO_MAX_IMAGE_BYTES"):
        open_image(img)


# ----- add-task ---------------------------------------------------------------------------------
def test_bomb_at_add_task_is_one_line_and_leaves_the_zoo(zoo, data, tmp_path):
    bad = tmp_path / "bombed"
    shutil.copytree(data / "digits", bad)
    bomb = write_bomb(bad / "train" / "one" / "zz_bomb.png")
    before = snapshot(zoo)
    res = CliRunner().invoke(main, ["add-task", "--zoo", str(zoo), "--name", "digits", "--data", str(bad),
                                    "--epochs", "1", "--json"])  # --json: no progress bars
    line = one_line(res)
    assert res.exit_code == 1 and str(bomb) in line and "pixels" in line
    assert snapshot(zoo) == before


# ----- predict ----------------------------------------------------------------------------------
def test_predict_answers_the_others_and_exits_2(zoo, data, tmp_path):
    good = sorted((data / "shapes" / "test").rglob("*.png"))[:2]
    bomb, cut, text = write_bomb(tmp_path / "bomb.png"), write_truncated(tmp_path / "cut.png"), write_text(
        tmp_path / "x.png")
    paths = [good[0], bomb, cut, text, good[1]]
    res = CliRunner().invoke(main, ["predict", "--zoo", str(zoo), "--json", *map(str, paths)])
    assert res.exit_code == 2, res.output
    preds = json.loads(res.stdout)
    assert [p["path"] for p in preds] == [str(p) for p in paths]
    for i in (0, 4):
        assert "error" not in preds[i] and preds[i]["task"] == "shapes" and preds[i]["label"]
    for i, words in ((1, "pixels"), (2, "truncated"), (3, "not an image")):
        assert set(preds[i]) == {"path", "error"}
        assert words in preds[i]["error"] and str(paths[i]) in preds[i]["error"] and "\n" not in preds[i]["error"]
    alone = json.loads(CliRunner().invoke(main, ["predict", "--zoo", str(zoo), "--json", str(good[1])]).stdout)
    assert (alone[0]["task"], alone[0]["label"]) == (preds[4]["task"], preds[4]["label"])
    assert alone[0]["score"] == pytest.approx(preds[4]["score"], abs=1e-4)  # batch numerics differ slightly
    text_out = CliRunner().invoke(main, ["predict", "--zoo", str(zoo), str(good[0]), str(cut)])
    assert text_out.exit_code == 2
    assert f"{cut}\terror: " in text_out.stdout and text_out.stdout.startswith(f"{good[0]}\tshapes\t")


def test_predict_api_keeps_order_when_all_are_bad(zoo, tmp_path):
    from clipzoo.zoo.zoo import Zoo

    preds = Zoo.open(zoo).predict([write_truncated(tmp_path / "a.png"), write_text(tmp_path / "b.png")])
    assert [set(p) for p in preds] == [{"path", "error"}] * 2


# ----- arguments before models ------------------------------------------------------------------
def test_missing_data_fails_fast_without_torch(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "registry.json").write_text("{}")
    code = ("import sys; from click.testing import CliRunner; from clipzoo.cli import main; "
            f"r = CliRunner().invoke(main, ['add-task', '--zoo', {str(tmp_path / 'zoo')!r}, '--name', 'x', "
            "'--data', '/does/not/exist']); print(r.exit_code, 'torch' in sys.modules); print(r.output)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert time.perf_counter() - t0 < 20, "the check must not load a model"
    first, *rest = out.stdout.splitlines()
    assert first == "1 False", out.stdout + out.stderr
    assert [line for line in rest if line.strip()] == [
        "error: data directory not found: /does/not/exist (expected /does/not/exist/train/<class>/*.png)"]


@pytest.mark.parametrize("args, words", [
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--lr", "nan"], "bad --lr nan"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--lr", "inf"], "bad --lr inf"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--lr", "-1"], "bad --lr -1"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--epochs", "0"], "bad --epochs 0"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:nope"], "unknown built-in domain"),
    (["add-task", "--zoo", "{zoo}", "--name", "bad name", "--data", "builtin:shapes"], "invalid task name"),
    (["add-task", "--zoo", "{zoo}", "--name", "x", "--data", "builtin:shapes", "--set", "rank"], "bad setting"),
    (["add-task", "--zoo", "{tmp}/nozoo", "--name", "x", "--data", "builtin:shapes"], "no zoo at"),
    (["predict", "--zoo", "{zoo}", "--top-k", "0", "{tmp}"], "bad --top-k 0"),
    (["predict", "--zoo", "{zoo}", "{tmp}/missing.png"], "no such image"),
    (["evaluate", "--zoo", "{zoo}", "--data", "{tmp}/missing"], "data directory not found"),
    (["router", "--zoo", "{zoo}", "--ood-quantile", "1.5"], "bad --ood-quantile"),
    (["init", "--zoo", "{zoo}"], "already exists"),
    (["bench", "--epochs", "0", "builtin:shapes"], "bad --epochs 0"),
    (["bench", "{tmp}/missing", "{tmp}/missing2"], "data directory not found"),
    (["bench-kinds", "--lr", "nan", "builtin:shapes"], "bad --lr nan"),
    (["bench-router", "builtin:shapes", "{tmp}/missing", "--lodo"], "data directory not found"),
    (["bench-fusion", "{tmp}/a", "{tmp}/b", "--new", "{tmp}/c"], "data directory not found"),
])
def test_bad_arguments_are_one_line_before_any_model(tmp_path, args, words):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "registry.json").write_text("{}")  # never read: the checks come first
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, [a.format(zoo=tmp_path / "zoo", tmp=tmp_path) for a in args])
    assert time.perf_counter() - t0 < 5
    assert res.exit_code == 1 and words in one_line(res), res.output
