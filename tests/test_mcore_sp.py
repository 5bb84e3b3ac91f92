"""training/mcore sequence parallelism (megatron's, with TP: `sequence_parallel=True`) against HF and PP=1.

- one process: the spec's norms are `RMSNorm` everywhere (megatron's WrappedTorchNorm refuses sequence
  parallelism), tagged `sequence_parallel` only under it; a length not divisible by tp is refused by name;
- under torchrun (tests/dist/mcore_sp.py, gloo, CPU): TP=2 with sequence parallelism equals the one-process HF
  model for the three families (packed row with image / text / video, DeepStack for Qwen3-VL; Qwen3-VL padded
  rows; Qwen2.5-VL tied): final hidden states, gathered logits, every gradient by HF name, and the (whole, per
  rank) gradients of the input embeddings and DeepStack features; TP=2 x PP=2 (1F1B, and interleaved with
  VPP=2) with sequence parallelism equals PP=1 and HF (losses, decoder and ViT gradients).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from test_mcore import tiny


def test_norms_are_tagged_only_under_sequence_parallelism():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from training.mcore.model import RMSNorm, local_modules, transformer_config

    layer = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    block = local_modules(TransformerBlockSubmodules(layer_specs=[layer] * 2, layer_norm=None))
    assert block.layer_norm is RMSNorm
    for spec in block.layer_specs:
        sub = spec.submodules
        assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
        assert sub.self_attention.submodules.q_layernorm is RMSNorm
        assert sub.self_attention.submodules.k_layernorm is RMSNorm
    tc = tiny("qwen3_vl").model.config.get_text_config()
    on, off = (RMSNorm(transformer_config(tc, 2, sequence_parallel=sp), 8, eps=1e-6) for sp in (True, False))
    assert on.weight.sequence_parallel is True and not hasattr(off.weight, "sequence_parallel")


def test_sequence_length_must_divide_by_tp():
    from training.mcore.model import check_sequence_length, transformer_config

    tc = tiny("qwen2_vl").model.config.get_text_config()
    config = transformer_config(tc, 2, sequence_parallel=True)
    check_sequence_length(config, 48)
    with pytest.raises(ValueError, match="sequence length 47 is not divisible by the tensor-parallel size 2"):
        check_sequence_length(config, 47)
    check_sequence_length(transformer_config(tc, 2), 47)  # no sequence parallelism: any length
    with pytest.raises(ValueError, match="sequence parallelism without tensor parallelism"):  # megatron's own
        transformer_config(tc, 1, sequence_parallel=True)


def _torchrun(nproc: int, mode: str, cases: int):
    from tests.conftest import REPO, clean_env

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(REPO / "tests" / "dist" / "mcore_sp.py"), mode],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**clean_env(), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == cases, p.stdout


@pytest.mark.slow  # ~10 s on 2 idle cores (35 s loaded), most of it the processes importing torch etc.
def test_tp2_sequence_parallel_under_torchrun_equals_hf():
    """2 processes: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (packed), Qwen3-VL (padded rows), Qwen2.5-VL tied; an odd
    length refused."""
    _torchrun(2, "tp2", 6)


@pytest.mark.slow  # ~20 s on 2 idle cores (50 s loaded): 4 processes, two layouts each against PP=1
def test_tp2_pp2_sequence_parallel_under_torchrun_equals_pp1():
    """4 processes: TP=2 x PP=2 (Qwen3-VL tied) and TP=2 x PP=2 x VPP=2 (Qwen3-VL) with sequence parallelism
    against PP=1 and HF; a schedule length not divisible by tp refused."""
    _torchrun(4, "tp2pp2", 3)
