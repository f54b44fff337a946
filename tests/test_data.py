"""Task data: built-in synthetic domains and ImageFolder directories, with clear errors."""

from __future__ import annotations

import pytest
from PIL import Image

from clipzoo.tasks.data import builtin_domains, load_builtin, load_imagefolder, load_task, open_image, write_imagefolder
from clipzoo.errors import ConfigError, DataError


def _folder(root, classes=("cat", "dog"), n=2):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(d / f"{i}.png")
    return root


def test_builtin_domains_are_deterministic_and_distinct():
    assert len(builtin_domains()) >= 4
    a, b = load_builtin("shapes", 3, 2), load_builtin("shapes", 3, 2)
    assert [im.tobytes() for im in a.train.images] == [im.tobytes() for im in b.train.images]
    train = {im.tobytes() for im in a.train.images}
    assert not train & {im.tobytes() for im in a.test.images}, "train and test images must differ"


def test_imagefolder_reads_classes_and_prompts(tmp_path):
    root = _folder(tmp_path / "pets", classes=("tabby_cat", "dog"))
    td = load_imagefolder(root)
    assert td.name == "pets" and td.classes == ["dog", "tabby_cat"]
    assert td.prompts_classes == ["dog", "tabby cat"]
    assert len(td.train) == 4 and sorted(set(td.train.labels)) == [0, 1]


def test_builtin_round_trips_through_imagefolder(tmp_path):
    td = load_builtin("textures", 2, 1)
    back = load_imagefolder(write_imagefolder(td, tmp_path / "textures"))
    assert back.classes == sorted(td.classes)
    assert len(back.train) == len(td.train)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: __import__("shutil").rmtree(r / "test"), "missing split 'test'"),
    (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "empty class folder"),
    (lambda r: __import__("shutil").rmtree(r / "train" / "dog"), "at least 2 classes"),
    (lambda r: (r / "test" / "bird").mkdir(), "test has classes not in train"),
])
def test_bad_folders_fail_clearly(tmp_path, breakage, message):
    root = _folder(tmp_path / "pets")
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_imagefolder(root)


def test_missing_directory_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown built-in domain"):
        load_task("builtin:nope")


def test_truncated_image_is_named(tmp_path):
    root = _folder(tmp_path / "pets")
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(DataError, match="0.png"):
        open_image(bad)


def test_invalid_task_name(tmp_path):
    root = _folder(tmp_path / "pets")
    with pytest.raises(ConfigError, match="invalid task name"):
        load_imagefolder(root, name="../evil")
