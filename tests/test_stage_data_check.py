"""The start-up probe checks the data against the objective: dpo needs preference samples, sapo RL prompts.
A mismatch fails in training.train.run_config before the loop builds a model or an engine."""
from __future__ import annotations

import logging

import pytest

from conftest import run_stage


@pytest.fixture
def loop_run(monkeypatch):
    """training.loop.run (model, engine, steps) replaced by a recorder: reaching it means the checks passed."""
    calls = []
    monkeypatch.setattr("training.loop.run", lambda job, *a, **k: calls.append(job) or {"steps": 0})
    return calls


@pytest.mark.parametrize("stage, mixture, needs, fix", [
    ("dpo", "{caption: 1}", "chosen/rejected", "stage.mixture={preference: 1}"),
    ("sapo", "{caption: 1, vqa: 2}", "prompt", "stage.mixture={rl: 1}"),
])
def test_objective_without_its_sample_kind_fails_before_the_engine(tmp_path, loop_run, stage, mixture, needs, fix):
    with pytest.raises(ValueError) as e:
        run_stage(tmp_path, [f"stage={stage}", f"stage.mixture={mixture}", "trainer.max_steps=2"])
    msg = str(e.value)
    assert f"stage.objective.name={stage} trains on samples of kind {needs}" in msg
    assert "data source(s) ['caption'" in msg and "caption: plain" in msg and fix in msg
    assert not loop_run and not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("stage, mixture", [("dpo", "{preference: 1}"), ("sapo", "{rl: 1}"), ("sft", "{caption: 1}")])
def test_objective_with_its_sample_kind_passes(tmp_path, loop_run, stage, mixture):
    run_stage(tmp_path, [f"stage={stage}", f"stage.mixture={mixture}", "trainer.max_steps=2"])
    assert len(loop_run) == 1


def test_a_source_with_none_of_the_kind_is_a_warning(tmp_path, loop_run, caplog):
    with caplog.at_level(logging.WARNING, logger="training"):
        run_stage(tmp_path, ["stage=dpo", "stage.mixture={preference: 1, caption: 1}", "trainer.max_steps=2"])
    assert len(loop_run) == 1
    warned = [r.getMessage() for r in caplog.records if "chosen/rejected only" in r.getMessage()]
    assert len(warned) == 1 and "['caption']" in warned[0] and "preference" not in warned[0].split("(")[0]
