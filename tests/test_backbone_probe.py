"""The backbone probe chooses on validation data: it fits on the training split less the carved
validation split and reports validation and test figures apart."""

from __future__ import annotations

import json
from pathlib import Path

from clipzoo.bench import backbone_probe
from clipzoo.tasks.data import load_builtin, write_imagefolder

ASSETS = Path(backbone_probe.__file__).resolve().parents[1] / "zoo" / "assets"


def test_probe_reports_validation_apart_from_test(tmp_path, capsys):
    for d in ("shapes", "colours"):
        write_imagefolder(load_builtin(d, n_train=20, n_test=6), tmp_path / d)
    backbone_probe.main(["--data-dir", str(tmp_path), "--domains", "shapes,colours", "--json",
                         "--config", str(ASSETS / "clipzoo-tiny.json"),
                         "--weights", str(ASSETS / "clipzoo-tiny.safetensors")])
    res = next(iter(json.loads(capsys.readouterr().out).values()))
    assert set(res["val_probe"]) == set(res["probe"]) == {"shapes", "colours"}
    for key in ("probe_mean", "val_probe_mean", "routing", "val_routing"):
        assert 0.0 <= res[key] <= 1.0
    # built-in domains this backbone was pretrained on: the probe and the domain Gaussians work
    assert res["val_routing"] > 0.8 and res["val_probe_mean"] > 1 / 3
