"""Ulysses sequence parallelism (training/sp.py, the DeepSpeed engine's Ulysses attention) against one rank.

- the model step: SP=2 (and DP=2 x SP=2) vs the same step on one rank, loss, per-token values and every gradient,
  for the three families, the ViT split and replicated, a row not a multiple of sp_size, a rank with no image to
  encode, a text-only batch (tests/dist/sp_step.py);
- the real loop on fixed global batches (tests/dist/fixed_batches.py, images + video + text rows of 255 tokens):
  4 processes at DP=2 x SP=2 end with the weights of 1 process;
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
def test_training_at_dp2_sp2_equals_one_process(tmp_path):
    """Qwen3-VL (DeepStack), 4 processes as 2 SP groups of 2: 3 optimizer steps; the logged losses, gradient norms,
    token counts and the final weights agree with 1 process. (SP=2 alone, the replicated ViT and Qwen2.5-VL's window
    ViT are checked at the step level by test_sp_step_equals_one_rank_step; SP=2 training resumes bit-identically in
    tests/test_end_to_end.py.)"""
    one = _run(tmp_path / "one", 1, family="qwen3_vl", **ROWS)
    dp2sp2 = _run(tmp_path / "dp2sp2", 4, family="qwen3_vl", sp=2, **ROWS)
    _same_run(dp2sp2, one, tmp_path / "dp2sp2", tmp_path / "one")


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



@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_memory_levers_leave_the_step_unchanged(family):
    """model.tiled_mlp (DeepSpeed's TiledMLP per decoder layer) and model.offload_activations (saved tensors in
    host memory) with gradient checkpointing: the same loss and gradients as the plain step, on a packed row with
    images, a video and text (on CPU the offload copies stay in host memory: this checks the hooks, not the
    transfer)."""
    import copy

    import torch

    from data.encode import IGNORE
    from data.pack import PackConfig, collate
    from test_packing import image_sample, text_sample, video_sample
    from training.engines.deepspeed import _tiled
    from training.models import ModelConfig, build
    from training.vlm import VLM

    bundle = build(ModelConfig(name=f"tiny_{family}", family=family))
    samples = [image_sample(bundle, 0), text_sample(bundle, 1), video_sample(bundle, 2, t=2), image_sample(bundle, 3)]
    cfg = PackConfig(seq_len=sum(len(x["input_ids"]) for x in samples), buffer_size=4,
                     pad_id=bundle.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    batch = collate([r for x in samples for r in packer.add(x)] + packer.flush(), cfg)
    weights = (batch["labels"][:, 1:] != IGNORE).float()

    def step(vlm):
        loss, _ = vlm(batch, weights=weights)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in vlm.named_parameters() if p.grad is not None}

    plain = VLM(copy.deepcopy(bundle.model).train())
    model = bundle.model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.language_model.layers:
        layer.mlp.forward = _tiled(layer.mlp, 3)
    levers = VLM(model)
    levers.offload_activations = True
    (a, ga), (b, gb) = step(plain), step(levers)
    assert torch.allclose(a, b, rtol=1e-6) and ga.keys() == gb.keys() and len(ga) > 10
    for k in ga:  # float32 round-off: TiledMLP sums the weight gradients of its shards in another order
        assert float((ga[k] - gb[k]).norm()) <= 1e-5 * float(ga[k].norm()) + 1e-8, k

# -- GPU-only (run when a CUDA machine is available; nothing here runs on the CPU CI) ----------------------------
CUDA = 0
try:
    import torch

    CUDA = torch.cuda.device_count()
except Exception:  # pragma: no cover - torch is a dependency
    pass


@pytest.mark.gpu
@pytest.mark.skipif(CUDA < 2, reason="GPU-only: the SP step on NCCL with flash-attention varlen needs 2 CUDA devices "
                                     "(the CPU tests above run the same script on gloo with sdpa_varlen)")
@pytest.mark.parametrize("attn", ["sdpa_varlen", "flash_attention_2"])
def test_sp_step_on_nccl_equals_one_rank_step(attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    env = {k: v for k, v in clean_env().items() if k != "DS_ACCELERATOR"}
    p = subprocess.run(TORCHRUN + ["--nproc-per-node=2", str(REPO / "tests" / "dist" / "sp_step.py"), "2", attn],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len([line for line in p.stdout.splitlines() if line.startswith("ok ")]) == 5, p.stdout


QWEN2_5_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


@pytest.mark.gpu
@pytest.mark.skipif(CUDA < 1, reason="GPU-only: a Qwen2.5-VL-3B-shaped model at 32K tokens needs a CUDA device")
def test_qwen2_5_vl_3b_shaped_step_at_32k_on_one_gpu():
    """One training step (forward + backward) of a random Qwen2.5-VL-3B-shaped model (bf16) on a 32K-token packed
    text row with the memory levers (checkpointing per layer, tiled MLP, the chunked loss): it runs, its loss is
    the random model's (~ln V), and it prints the peak memory and tokens/s (figures for the issue note)."""
    import math
    import time

    import training.attention  # noqa: F401 - sdpa_varlen
    from training.memory import make_batch
    from training.models import FAMILIES
    from training.engines.deepspeed import _tiled
    from training.vlm import VLM

    fam = FAMILIES["qwen2_5_vl"]
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    special = dict(bos_token_id=None, eos_token_id=151645, pad_token_id=151643)
    cfg = fam.config_cls(text_config=dict(QWEN2_5_VL_3B_TEXT, **ids, **special), vision_config=QWEN2_5_VL_3B_VISION,
                         tie_word_embeddings=True, **ids, **special)
    attn = "flash_attention_2" if _has("flash_attn") else "sdpa_varlen"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = fam.model_cls._from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.language_model.layers:
        layer.mlp.forward = _tiled(layer.mlp, 4)
    vlm = VLM(model.train())
    L = 32768
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_batch(L, 8192, 1.0).items()}
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = vlm(batch, weights=batch["weights"])
        loss = loss / batch["weights"].sum()
        loss.backward()
        vlm.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"qwen2.5-vl-3b-shaped, {L} tokens, {attn}, bf16: peak {peak:.1f} GiB, {L / min(times):.0f} tokens/s")
    assert abs(float(loss) - math.log(151936)) < 1.0 and peak < 80


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
