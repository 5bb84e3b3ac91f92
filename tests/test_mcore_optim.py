"""training/mcore/optim.py: megatron's DDP gradient buffers and (distributed) optimizer as engine=megatron's data
parallelism.

In one process (dp = tp = pp = 1, a one-process gloo group; CPU only: the optimizers run under `on_cpu()`):
- `on_cpu()` redirects exactly what its docstring says and nothing outside the context;
- a tiny Qwen3-VL Decoder and its ViT, two steps of DataParallel (distributed and not) equal the engine's own step
  (torch AdamW, clip_grads_with_norm_, the engine's norm: tests/dist/mcore_optim.py's oracle); p.grad stays None,
  the gradients are in p.main_grad; no forward hook is registered;
- the groups keep our keys, and setting group["lr"] (the engine's LR schedule) takes effect (lr 0: no change);
- bf16: fp32 main shards, reloaded from the weights by reload_model_params;
- a non-finite gradient skips the step; the state dict loads with torch.load(weights_only=True);
- what cannot work is refused (averaging DDP config, a parameter in two groups, another state layout).
Under torchrun (tests/dist/mcore_optim.py, one 4-process launch): dp2 x tp2, dp2 x pp2 (tied embeddings) and
dp4 x ep2 (MoE) against the engine's step for three clipped steps, bit-identical resume, bf16 (pp2), skipped
non-finite steps.
"""
from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import mcore_optim as oracle  # noqa: E402  (tests/dist/mcore_optim.py: the engine's step, the builders)

from test_mcore import tiny  # noqa: E402
from test_mcore_pp import microbatches  # noqa: E402


@pytest.fixture(scope="module")
def parallel():
    from training.mcore import shim

    if torch.cuda.is_available():
        pytest.skip("CPU tests: training/mcore/shim.py and shim.on_cpu are off on CUDA machines")
    created = shim.init_model_parallel(1, seed=1234)
    yield
    shim.destroy(created)


@pytest.fixture(scope="module")
def case(parallel):
    bundle = tiny("qwen3_vl")
    return bundle.model, microbatches(bundle, 2)


def test_on_cpu_redirects_only_inside():
    from training.mcore.shim import on_cpu

    if torch.cuda.is_available():
        pytest.skip("a no-op where CUDA is available")
    x, h = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    with on_cpu():
        assert x.type() == "torch.cuda.FloatTensor" and h.type() == "torch.cuda.BFloat16Tensor"
        assert torch.nn.Parameter(x).type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions untouched
        assert torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert x.type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def _dp(base, distributed: bool, bucket_size=None):
    bundle, chunks, module, groups = oracle.build(base, torch.float32)
    return bundle, chunks, module, groups, oracle.make_dp(module, chunks, groups, distributed, bucket_size)


@pytest.mark.parametrize("distributed", [True, False])
def test_one_process_equals_the_engines_step(case, distributed):
    base, mbs = case
    bundle, chunks, module, groups = oracle.build(base, torch.float32)
    opt = torch.optim.AdamW(groups, betas=oracle.BETAS, eps=oracle.EPS)
    ref = []
    for _ in range(2):
        oracle.forward_backward(bundle, chunks, mbs)
        norm, _ = oracle.engine_step(opt, chunks)
        ref.append((oracle.params_of(module), norm))

    bundle, chunks, module, groups, dp = _dp(base, distributed)
    got = []
    for _ in range(2):
        oracle.forward_backward(bundle, chunks, mbs)
        params = [p for p in module.parameters() if p.requires_grad]
        assert all(p.grad is None for p in params) and any(p.main_grad.any() for p in params)
        dp.finish_grads()
        norm, skipped = dp.step(oracle.CLIP)
        assert not skipped and norm > 10 * oracle.CLIP  # clipping is on
        got.append((oracle.params_of(module), norm))
    oracle.compare(f"one process distributed={distributed}", got, ref)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_groups_keep_our_keys_and_their_lr(case):
    base, mbs = case
    bundle, chunks, module, groups, dp = _dp(base, True)
    assert [(g["name"], g["group"], g["lr"], g["weight_decay"]) for g in dp.param_groups] == \
        [(g["name"], g["group"], g["lr"], g["weight_decay"]) for g in groups]
    assert all(p.dtype == torch.float32 for g in dp.param_groups for p in g["params"])
    for g in dp.param_groups:
        g["lr"] = 0.0
    before = oracle.params_of(module)
    oracle.forward_backward(bundle, chunks, mbs)
    dp.finish_grads()
    norm, skipped = dp.step(oracle.CLIP)
    assert not skipped and norm > 0
    assert all(torch.equal(before[k], v) for k, v in oracle.params_of(module).items())
    assert all(float(s["step"]) == 1 for s in dp.optimizers[0].optimizer.state.values())


def test_bf16_has_fp32_main_shards_and_reloads_them(case):
    """bf16 weights, fp32 main shards; weights changed outside the optimizer survive a step at lr 0 only after
    reload_model_params (the step writes the main shards back into the weights)."""
    base, mbs = case
    bundle, chunks, module, groups = oracle.build(base, torch.bfloat16)
    dp = oracle.make_dp(module, chunks, groups, True, None)
    assert all(p.dtype == torch.float32 for g in dp.param_groups for p in g["params"])
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    oracle.forward_backward(bundle, chunks, mbs)
    dp.finish_grads()
    norm, skipped = dp.step(oracle.CLIP)
    assert not skipped and norm > 0
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    dp.reload_model_params()
    for g in dp.param_groups:
        g["lr"] = 0.0
    moved = oracle.params_of(module)
    oracle.forward_backward(bundle, chunks, mbs)
    dp.finish_grads()
    dp.step(oracle.CLIP)
    assert all(torch.equal(moved[k], v) for k, v in oracle.params_of(module).items())


def test_non_finite_is_skipped_and_the_state_loads_weights_only(case):
    base, mbs = case
    bundle, chunks, module, groups, dp = _dp(base, True, bucket_size=100_000)
    oracle.forward_backward(bundle, chunks, mbs)
    dp.finish_grads()
    dp.step(oracle.CLIP)
    oracle.check_skip("one process", dp, module)
    buf = io.BytesIO()
    torch.save(dp.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["format"] == 1 and state["distributed"] and len(state["parts"]) == 1
    dp.load_state_dict(state)
    _, _, _, _, plain = _dp(base, False)
    with pytest.raises(ValueError, match="does not fit"):
        plain.load_state_dict(state)
    _, chunks, module, groups = oracle.build(base, torch.float32)
    other = oracle.make_dp(module, chunks, groups[::-1], True, None)  # another layout of the shards
    with pytest.raises(ValueError, match="does not fit this layout"):
        other.load_state_dict(state)


def test_refusals(case):
    from training.mcore.optim import DataParallel

    base, _ = case
    _, chunks, module, groups = oracle.build(base, torch.float32)
    averaging = copy.copy(chunks[0].config)
    averaging.calculate_per_token_loss = False
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        DataParallel(module, chunks, groups, oracle.BETAS, oracle.EPS, averaging)
    twice = groups + [{**groups[0], "name": "again"}]
    with pytest.raises(ValueError, match="in two groups"):
        DataParallel(module, chunks, twice, oracle.BETAS, oracle.EPS, chunks[0].config)


@pytest.mark.slow  # ~60 s on 2 cores: 4 processes, three layouts, ~60 optimizer steps
def test_dp2_tp2_dp2_pp2_dp4_ep2_under_torchrun_equal_the_engines_step():
    from tests.conftest import REPO, clean_env

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                        str(REPO / "tests" / "dist" / "mcore_optim.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**clean_env(), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == 20, p.stdout
