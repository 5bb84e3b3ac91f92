"""Ulysses sequence parallelism (training/sp.py, the DeepSpeed engine's Ulysses attention) against one rank.

- the model step: SP=2 (and DP=2 x SP=2) vs the same step on one rank, loss, per-token values and every gradient,
  for the three families, the ViT split and replicated, a row not a multiple of sp_size, a rank with no image to
  encode, a text-only batch (tests/dist/sp_step.py);
- the real loop on fixed global batches (tests/dist/fixed_batches.py, images + video + text rows of 255 tokens):
  2 processes at SP=2 and 4 processes at DP=2 x SP=2 end with the weights of 1 process;
- settings that cannot work are refused before any model is built.
The kill-and-resume case at SP=2 is in tests/test_end_to_end.py; the tiny pipeline's s2/s3 at SP=2 in
tests/test_pipeline.py.
"""
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env, compose, metrics_rows
from test_mixed_batches import _assert_same, _run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.slow
def test_sp_step_equals_one_rank_step():
    p = subprocess.run(TORCHRUN + ["--nproc-per-node=2", str(REPO / "tests" / "dist" / "sp_step.py"), "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == 5, p.stdout


ROWS = dict(tasks="caption,video,text,vqa", seq_len=255, attention="varlen")  # 255: not a multiple of 2


def _same_run(a, b, out_a, out_b):
    """Same losses and weights, and the same gradient norms: Adam forgives a gradient off by a constant factor (a
    loss normalised by the process count instead of the data-parallel size), the norm does not."""
    _assert_same(a, b, 5e-5)
    na, nb = ([r["grad_norm"] for r in metrics_rows(o)] for o in (out_a, out_b))
    assert na == pytest.approx(nb, rel=1e-5)
    assert [r["tokens"] for r in metrics_rows(out_a)] == [r["tokens"] for r in metrics_rows(out_b)]


@pytest.mark.slow
def test_training_at_sp2_and_dp2_sp2_equals_one_process(tmp_path):
    """Qwen3-VL (DeepStack): 3 optimizer steps; the logged losses and the final weights agree."""
    one = _run(tmp_path / "one", 1, family="qwen3_vl", **ROWS)
    sp2 = _run(tmp_path / "sp2", 2, family="qwen3_vl", sp=2, **ROWS)
    _same_run(sp2, one, tmp_path / "sp2", tmp_path / "one")
    dp2sp2 = _run(tmp_path / "dp2sp2", 4, family="qwen3_vl", sp=2, **ROWS)
    _same_run(dp2sp2, one, tmp_path / "dp2sp2", tmp_path / "one")


@pytest.mark.slow
def test_training_at_sp2_replicated_vit_equals_one_process(tmp_path):
    """Qwen2.5-VL (window-attention ViT), every SP rank encoding every image."""
    one = _run(tmp_path / "one", 1, family="qwen2_5_vl", **ROWS)
    sp2 = _run(tmp_path / "sp2", 2, family="qwen2_5_vl", sp=2, sp_vision="replicate", **ROWS)
    _same_run(sp2, one, tmp_path / "sp2", tmp_path / "one")


def _check(overrides, world):
    from training.train import check_job, to_job

    check_job(to_job(compose(overrides)), world)


def test_sp_sizes_that_cannot_work_are_refused():
    _check(["parallel.sp_size=2"], 2)  # the tiny models: 6 query heads, 2 key/value heads
    _check(["parallel.sp_size=6"], 6)  # key/value heads replicated 3x
    with pytest.raises(ValueError, match=r"6 query, 2 key/value.*sizes that work: \[1, 2, 6\]"):
        _check(["parallel.sp_size=4"], 4)
    with pytest.raises(ValueError, match="does not divide the 3 processes"):
        _check(["parallel.sp_size=2"], 3)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        _check(["parallel.sp_size=0"], 1)
    with pytest.raises(ValueError, match="parallel.sp_vision='both'"):
        _check(["parallel.sp_vision=both"], 1)
    with pytest.raises(ValueError, match="sapo objective cannot run sequence-parallel"):
        _check(["stage=sapo", "parallel.sp_size=2"], 2)
    with pytest.raises(ValueError, match="needs a varlen attention"):
        _check(["parallel.sp_size=2", "model.attn_implementation=sdpa"], 2)


def test_the_image_share_is_contiguous_and_balanced():
    from training.sp import share

    assert share([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert share([100, 1, 1, 1], 2) == [0, 1, 1, 1]  # the big image's middle lies in the first half
    assert share([5], 4) == [2]
    owners = share([3, 9, 4, 4, 8, 1, 6], 3)
    assert owners == sorted(owners) and set(owners) == {0, 1, 2}
