"""launch.report on hand-made step directories: the per-step data skip/drop counts."""
from __future__ import annotations

import json

from launch.report import write_report


def _step(out, name, rows, done=None):
    d = out / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done is not None:
        (d / "DONE").write_text(json.dumps(done))
    return {"name": name, "dir": str(d)}


def _section(report: str, name: str) -> str:
    return report.split(f"## {name}", 1)[1].split("\n## ", 1)[0]


def test_report_shows_each_steps_skipped_and_dropped_samples(tmp_path):
    row = {"step": 1, "loss": 2.0, "lr": 1e-4, "tokens": 10}
    steps = [
        # DONE holds the step's cumulative counts (a metrics row may be older): DONE wins
        _step(tmp_path, "a", [row, {**row, "step": 2, "skipped/docs/bad_image": 1}],
              {"steps": 2, "skipped/docs/bad_image": 3, "dropped/web/x/too_long": 2, "skipped/docs/other": 0}),
        # an unfinished step: the last metrics row
        _step(tmp_path, "b", [row, {**row, "step": 2, "dropped/caption/too_long": 5}]),
        _step(tmp_path, "c", [row], {"steps": 1}),  # nothing skipped: no table
    ]
    (tmp_path / "pipeline.json").write_text(json.dumps({"name": "t", "steps": steps}))
    report = write_report(tmp_path, evaluate=False).read_text()
    a, b, c = (_section(report, n) for n in "abc")
    assert "| skipped | docs | bad_image | 3 |" in a and "| dropped | web/x | too_long | 2 |" in a
    assert "other" not in a  # zero counts are left out
    assert "| dropped | caption | too_long | 5 |" in b
    assert "Data skipped" not in c and "| data |" not in c
