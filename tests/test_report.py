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


def test_report_shows_the_held_out_losses_and_the_source_epochs(tmp_path):
    rows = [{"step": i, "loss": 3.0 - 0.1 * i, "lr": 1e-4, "tokens": 10} for i in range(1, 5)]
    rows[1].update({"eval/loss": 2.5, "eval/loss/vqa": 2.4, "eval/loss/caption": 2.6})
    rows[3].update({"eval/loss": 2.0, "eval/loss/vqa": 1.9, "eval/loss/caption": 2.1})
    steps = [_step(tmp_path, "a", rows, {"steps": 4, "epoch/vqa": 2, "epoch/caption": 0})]
    (tmp_path / "pipeline.json").write_text(json.dumps({"name": "t", "steps": steps}))
    a = _section(write_report(tmp_path, evaluate=False).read_text(), "a")
    assert "| held-out | step 2 | step 4 |" in a
    assert "| eval/loss | 2.500 | 2.000 |" in a and "| eval/loss/vqa | 2.400 | 1.900 |" in a
    assert "passes completed): vqa 2" in a and "caption 0" not in a  # sources still in their first pass: not shown
    assert "| epoch |" not in a  # not a skip/drop count


# ---------------------------------------------------------------- training.plot


def _metrics_run(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=4):
    """Rows as the loop logs them: the stage lr, each parameter group's (a group's _no_decay half alike)."""
    rows = []
    for i in range(1, n + 1):
        lr = 1e-4 * (1 - i / (n + 1))
        rows.append({"step": i, "loss": 3.0 - 0.1 * i, "lr": lr, "tokens_per_s": 5000.0 + i, "samples_per_s": 40.0 + i,
                     "lr/vision": lr / 10, "lr/vision_no_decay": lr / 10, "lr/merger": lr, "lr/merger_no_decay": lr,
                     "lr/llm": lr / 2, "lr/llm_no_decay": lr / 2})
    return rows


def _lines(ax) -> dict:
    return {l.get_label(): list(l.get_ydata()) for l in ax.get_lines()}


def test_plot_draws_one_lr_line_per_group_and_throughput_on_two_axes(tmp_path):
    import matplotlib.pyplot as plt

    from training import plot

    rows = _rows()
    run = _metrics_run(tmp_path / "run", rows)
    figs = plot.figures([run])
    try:
        (lr_ax,) = figs["lr"].axes
        lines = _lines(lr_ax)
        assert sorted(lines) == ["lr/llm", "lr/merger", "lr/vision"]  # the _no_decay halves have the same lr
        assert lines["lr/vision"] == [r["lr/vision"] for r in rows]
        top, bottom = figs["throughput"].axes  # two panels: samples/s would be flat on the tokens/s scale
        assert list(_lines(top)) == ["samples_per_s"] and list(_lines(bottom)) == ["tokens_per_s"]
        assert top.get_ylabel() == "samples/s" and bottom.get_ylabel() == "tokens/s"
        assert _lines(top)["samples_per_s"] == [r["samples_per_s"] for r in rows]
    finally:
        for f in figs.values():
            plt.close(f)
    written = plot.plot([run])
    assert {p.name for p in written} == {"loss.png", "lr.png", "throughput.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_plot_keeps_a_no_decay_lr_that_differs_and_a_run_without_group_lrs(tmp_path):
    import matplotlib.pyplot as plt

    from training import plot

    odd = [{**r, "lr/llm_no_decay": r["lr/llm"] * 2} for r in _rows()]
    old = [{k: v for k, v in r.items() if not k.startswith("lr/")} for r in _rows()]
    a, b = _metrics_run(tmp_path / "a", odd), _metrics_run(tmp_path / "b", old)
    figs = plot.figures([a, b])
    try:
        assert sorted(_lines(figs["lr"].axes[0])) == ["a: lr/llm", "a: lr/llm_no_decay", "a: lr/merger",
                                                      "a: lr/vision", "b: lr"]
    finally:
        for f in figs.values():
            plt.close(f)
