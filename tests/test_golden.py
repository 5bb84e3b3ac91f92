"""The rewritten model step (issue 13) against the numbers main computed before it: per-step losses and gradient
norms of 20-step runs of every tiny family for s1_multimodal, sft, dpo and sapo (tests/golden.py records them)."""
from __future__ import annotations

import json
import math

import pytest

import golden

EXPECTED = json.loads(golden.FILE.read_text())


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("model,stage", golden.cases(), ids=[f"{m}-{s}" for m, s in golden.cases()])
def test_losses_and_grad_norms_match_the_recorded_golden_run(model, stage, tmp_path):
    want = EXPECTED[f"{model}/{stage}"]
    got = golden.run(model, stage, tmp_path / "run")
    assert len(got["loss"]) == golden.STEPS
    for key in ("loss", "grad_norm"):
        bad = [(i + 1, w, g) for i, (w, g) in enumerate(zip(want[key], got[key])) if not _close(w, g)]
        assert not bad, f"{key} differs from the golden run at (step, golden, now): {bad[:5]}"
