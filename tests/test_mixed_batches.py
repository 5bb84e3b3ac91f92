"""Split independence of the loss normalisation, and mixed text-only / image micro-batches under ZeRO-3.

Both run the real loop (tests/dist/fixed_batches.py) on fixed global batches of packed rows, so any layout
trains on the same data: 2 ranks × 2 micro-batches must give the weights of 1 rank with the whole batch.
For the mixed case rank 0 trains on an image row while rank 1 trains on a text-only one; without care
rank 0 waits in the ViT's parameter all-gather forever (DESIGN.md facts).
"""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, clean_env, metrics_rows

SCRIPT = str(REPO / "tests" / "dist" / "fixed_batches.py")


def _run(out, nproc, **opts):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    p = subprocess.run(launcher + [SCRIPT, str(out)] + [f"{k}={v}" for k, v in opts.items()], cwd=REPO,
                       capture_output=True, text=True, timeout=400, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = metrics_rows(out)  # the loss, and a MoE model's router-loss value
    return [(r["loss"], r.get("moe/aux_loss")) for r in rows], load_file(str(out / "weights.safetensors"))


def _assert_same(a, b, atol):
    (la, wa), (lb, wb) = a, b
    # the logged losses agree to float32 round-off; Adam (lr 1e-3) turns round-off in tiny gradients into
    # weight differences well below one step's size, so weights are compared at a fraction of a step
    for (loss_a, aux_a), (loss_b, aux_b) in zip(la, lb, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=0)
        assert (aux_a is None) == (aux_b is None) and (aux_a is None or aux_a == pytest.approx(aux_b, rel=1e-6))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A distillation teacher for the tiny qwen2_5_vl: another seed's starting weights, exported."""
    from tests.conftest import run_stage

    out = tmp_path_factory.mktemp("teacher")
    run_stage(out, ["model=tiny_qwen2_5_vl", "model.init_seed=1", "trainer.max_steps=0"])
    return out / "hf"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lm", "distill", "moe"])  # lm token reduction: test_sequence_parallel.py
def test_two_ranks_two_micro_batches_equal_one_rank_whole_batch(tmp_path, case, request):
    """2 ranks x 2 accumulation micro-batches: both ways of splitting the global batch at once (a loss normalised
    per micro-batch or per rank instead of by the global weight sum fails it). lm: the sqrt reduction (its
    per-sample weights need whole samples); distill: the jsd to a teacher with per-sample weights, on 2 ranks under
    ZeRO-3 (teacher partitioned, loss chunks recomputed in backward) against 1 rank's fused chunks; moe: the tiny
    MoE model's load-balancing and z losses (training/moe.py) over the global batch, its expert counts from a
    routing pass on 2 ranks x 2 micro-batches (a loss balanced per micro-batch or per rank fails it), under ZeRO-3
    with the sparse blocks as leaf modules."""
    if case == "lm":
        opts, engine2 = dict(reduction="sqrt"), "zero2"
    elif case == "moe":
        opts = {"family": "qwen3_vl_moe", "stage.moe.aux_loss_coef": "0.2", "stage.moe.z_loss_coef": "0.01"}
        engine2 = "zero3"
    else:
        opts = {"reduction": "sample", "stage": "distill", "stage.objective.divergence": "jsd",
                "stage.objective.teacher": str(request.getfixturevalue("teacher")), "model.loss_chunk": "16"}
        engine2 = "zero3"
    one = _run(tmp_path / "one", 1, micro=4, **opts)  # 1 rank, the whole global batch at once
    two = _run(tmp_path / "two", 2, micro=1, engine=engine2, **opts)  # 2 ranks x 2 micro-batches
    _assert_same(two, one, 5e-5)


@pytest.mark.slow
# qwen3_vl: DeepStack's extra ViT outputs (the dummy pass is family-agnostic); qwen3_vl_moe: the ranks also route
# their tokens to different experts, and the text-only rank to fewer (the sparse blocks are ZeRO-3 leaf modules)
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_zero3_mixed_batch_matches_single_process(tmp_path, family):
    two = _run(tmp_path / "two", 2, family=family, engine="zero3", arrange="mixed")
    one = _run(tmp_path / "one", 1, family=family, engine="zero2", arrange="mixed")
    vision = [k for k in two[1] if ".visual." in k]
    assert vision and any("deepstack" in k for k in vision) == family.startswith("qwen3_vl")
    _assert_same(two, one, 5e-5)
