"""The megatron Decoder at tensor-parallel size 2 against the one-process HF model (run under torchrun, gloo, CPU).

`torchrun --nproc-per-node=2 mcore_tp.py`. Every rank builds the same tiny HF model and the same packed row
(tests/test_mcore.py `packed_case`: image, text and video samples, real M-RoPE ids, DeepStack for Qwen3-VL) and
computes the HF reference itself. The Decoder's weights on each rank are `hf_to_mcore(..., tp=2, rank)`. Checked
per case: the final hidden states (full on every rank), the logits gathered over the two vocab shards, and, after
backward of sum(logits * w) (each rank's loss over its own vocab shard, the vocab-parallel way; the hidden-state
gradient is all-reduced by the column-parallel head), every gradient: the two ranks' gradients converted back by
`mcore_to_hf` equal HF's. Prints "ok <case>" per case: the three families, Qwen2.5-VL with tied embeddings, and
Qwen3-VL with one key/value head (tp > groups: megatron all-gathers the qkv output and replicates the head).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_mcore import (ATOL, GRAD_RTOL, hf_forward, logit_weights, mc_forward, packed_case,  # noqa: E402
                        relative_error, tiny)
from training.mcore import shim  # noqa: E402
from training.mcore.convert import hf_to_mcore, mcore_to_hf  # noqa: E402
from training.mcore.model import Decoder  # noqa: E402

TP = 2


def run(family: str, tied: bool, kv_heads, rank: int) -> None:
    bundle = tiny(family, tied, kv_heads)
    model = bundle.model
    tc = model.config.get_text_config()
    vocab = tc.vocab_size
    dec = Decoder(tc, tied=tied)
    dec.load(hf_to_mcore(model.state_dict(), tc, TP, rank))
    case = packed_case(bundle)
    w = logit_weights(case, vocab)

    hidden, logits = hf_forward(model, case)
    (logits * w).sum().backward()
    mh, local = mc_forward(model, dec, case)
    shard = local.shape[-1]  # this rank's vocabulary: ids rank*shard .. (rank+1)*shard, padded past `vocab`
    w_local = torch.nn.functional.pad(w, (0, shard * TP - vocab))[..., rank * shard:(rank + 1) * shard]
    (local * w_local).sum().backward()

    assert (mh - hidden).abs().max() <= ATOL, (family, "hidden")
    parts = [torch.empty_like(local) for _ in range(TP)]
    dist.all_gather(parts, local.detach().contiguous())
    gathered = torch.cat(parts, -1)
    assert (gathered[..., :vocab] - logits).abs().max() <= ATOL, (family, "logits")
    assert (gathered[..., vocab:] == 0).all()

    dec.reduce_tp_partial_grads()  # q/k-norm gradients: partial per rank (finalize_model_grads' qk_layernorm sum)
    check_grads_against_hf(dec, model, family, tied)


def check_grads_against_hf(dec, model, family: str, tied: bool) -> None:
    """Every TP rank's decoder gradients (reduced over TP), gathered and converted by mcore_to_hf, equal the HF
    model's (a tied head's lm_head entry is the embedding's)."""
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, {k: p.grad for k, p in dec.named_parameters()})
    grads = mcore_to_hf(shards, model.config.get_text_config())
    hf_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(hf_grads) == set(grads) - ({"lm_head.weight"} if tied else set()), family
    for k, g in hf_grads.items():
        assert relative_error(grads[k], g) <= GRAD_RTOL, (family, k, relative_error(grads[k], g))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shim.init_model_parallel(TP)
    for family, tied, kv_heads in (("qwen2_vl", False, None), ("qwen2_5_vl", False, None), ("qwen3_vl", False, None),
                                   ("qwen2_5_vl", True, None), ("qwen3_vl", False, 1)):
        run(family, tied, kv_heads, rank)
        if rank == 0:
            print(f"ok {family}{' tied' if tied else ''}{f' kv_heads={kv_heads}' if kv_heads else ''}", flush=True)
    shim.destroy(False)
    dist.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process


if __name__ == "__main__":
    main()
