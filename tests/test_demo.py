"""`clipzoo demo` and `clipzoo bench` on the built-in domains: a report a user can read."""

from __future__ import annotations

import json

from functools import partial

from click.testing import CliRunner

from clipzoo.cli import main


def test_demo_writes_report_and_zoo_forgets_less_than_naive(tmp_path, monkeypatch):
    from clipzoo.bench import demo

    # the demo's own pipeline with the feature-space baselines only, untuned (the fine-tuning
    # baselines and the tuning are covered by tests/test_finetune.py and tests/test_harness.py)
    monkeypatch.setattr(demo, "BenchSettings", partial(demo.BenchSettings, tune=False,
                                                      methods=["zero-shot", "slda", "adapter-naive"]))
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    for key in ("tasks", "acc_matrix", "metrics", "baselines", "timing", "settings"):
        assert key in r
    m = r["metrics"]
    for key in ("avg_mtil", "avg_inc", "last", "forgetting", "bwt", "transfer", "task_agnostic_acc", "oracle_acc", "routing_accuracy"):
        assert key in m
    assert m["routing_accuracy"] > 0.9
    assert m["forgetting"] < r["baselines"]["adapter-naive"]["forgetting"]
    assert {"zero-shot", "adapter-naive"} <= set(r["baselines"])
    for f in ("report.json", "report.md", "acc_matrix.png"):
        assert (out / f).is_file()
    assert (out / "zoo" / "registry.json").is_file()
    assert "| zoo (routed) |" in (out / "report.md").read_text()
