"""Loss reductions: per-token weights follow the definitions, and the trained weights do not depend on how the
global batch is split into micro-batches and accumulation steps (2-rank splits: test_end_to_end)."""
import pytest
import torch

from conftest import load_hf, metrics_rows, run_stage
from data.encode import IGNORE
from stages.lm import token_weights


def test_weights_follow_the_definitions():
    # two samples in one row (as packing will produce) and one in another; the first target is never counted
    labels = torch.tensor([[IGNORE, 5, 5, 5, 5, IGNORE, 7], [IGNORE, IGNORE, 9, 9, 9, 9, 9]])
    sids = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [2, 2, 2, 2, 2, 2, 2]])
    n = {0: 4, 1: 1, 2: 5}  # supervised targets per sample after the shift
    for reduction, f in (("token", lambda k: 1.0), ("sample", lambda k: 1 / k), ("sqrt", lambda k: k ** -0.5)):
        w = token_weights(labels, sids, reduction)
        expected = torch.zeros_like(w)
        for r in range(2):
            for t in range(6):
                if labels[r, t + 1] != IGNORE:
                    expected[r, t] = f(n[int(sids[r, t + 1])])
        assert torch.allclose(w, expected), reduction
    # the sqrt loss of constant per-token losses l_i is sum_i sqrt(n_i) l_i / sum_i sqrt(n_i)
    w = token_weights(labels, sids, "sqrt")
    ce = torch.zeros_like(w)
    ce[0, :4], ce[0, 5], ce[1, 1:] = 1.0, 2.0, 3.0
    want = (2 * 1.0 + 1 * 2.0 + 5 ** 0.5 * 3.0) / (2 + 1 + 5 ** 0.5)
    assert abs(float((w * ce).sum() / w.sum()) - want) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["token", "sample", "sqrt"])
def test_micro_batch_and_accumulation_split_does_not_change_training(reduction, tmp_path):
    runs = {}
    for mbs, ga in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{mbs}x{ga}"
        run_stage(out, [f"stage.objective.loss_reduction={reduction}", "trainer.max_steps=3", "trainer.save_every=0",
                        f"trainer.micro_batch_size={mbs}", f"trainer.grad_accum={ga}", "model=tiny_qwen2_5_vl"])
        losses = [row["loss"] for row in metrics_rows(out)]
        runs[(mbs, ga)] = (losses, load_hf(out / "hf"))
    ref_losses, ref_w = runs[(4, 1)]
    for key, (losses, w) in runs.items():
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (key, losses, ref_losses)
        assert max(float((w[k] - ref_w[k]).abs().max()) for k in w) < 1e-5, key
