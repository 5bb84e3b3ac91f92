"""The pipelined megatron Decoder against PP=1 in one process and HF (run under torchrun, gloo, CPU).

`torchrun --nproc-per-node=2 mcore_pp.py pp2` or `--nproc-per-node=4 mcore_pp.py tp2pp2`. Per case every rank
builds the same tiny HF model and the same packed micro-batches (tests/test_mcore_pp.py `microbatches`: rows of
SEQ_LEN tokens, image / text / video samples, one text-only row), then:

1. the pipelined layout (tp, pp, vpp): `build_chunks`, one step of megatron's schedule (1F1B, or interleaved with
   vpp) with `forward_step` (the ViT and the merge on the first stage), `finalize_grads`; every rank's decoder
   gradients gathered and converted to HF names (`merge_pp` over the chunks, `mcore_to_hf` over TP), the ViT's
   gradients from the first stage, the loss sums from the last;
2. PP=1 in one process on each rank (parallel state rebuilt as tp=1, pp=1): the same step;
3. checked: each loss sum equals PP=1's and HF's, every gradient by HF name (decoder and ViT) equals PP=1's within
   1e-5 relative, and with tied embeddings the last stage's head copy holds the embedding's whole gradient.
Prints "ok <case>" per case.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_mcore import GRAD_RTOL, lm_state, relative_error, tiny  # noqa: E402
from test_mcore_pp import LOSS_RTOL, hf_loss, microbatches, run_schedule, vit_grads  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from training.mcore import pipeline  # noqa: E402
from training.mcore.convert import mcore_to_hf, merge_pp  # noqa: E402

# (family, tied, tp, pp, vpp, micro-batches); the tiny decoder has 4 layers and 3 DeepStack features (Qwen3-VL)
CASES = {"pp2": [("qwen3_vl", False, 1, 2, None, 3), ("qwen2_5_vl", True, 1, 2, None, 3),
                 ("qwen3_vl", True, 1, 2, 2, 4)],
         "tp2pp2": [("qwen3_vl", True, 2, 2, None, 3), ("qwen3_vl", False, 2, 2, 2, 4)]}


def gathered(chunks, model, tc, tied, tp, pp) -> tuple[dict, dict, list]:
    """(decoder gradients by HF name, ViT gradients, [(tp rank, chunk, its gradients)]), the same on every rank."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    mine = [(ps.get_tensor_model_parallel_rank(), (c.vp_stage or 0) * pp + ps.get_pipeline_model_parallel_rank(),
             {k: p.grad for k, p in c.named_parameters()}) for c in chunks]
    vit = vit_grads(model) if ps.is_pipeline_first_stage() and ps.get_tensor_model_parallel_rank() == 0 else None
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (mine, vit))
    shards = [[None] * (pp * (vpp or 1)) for _ in range(tp)]
    for chunk_grads, _ in parts:
        for r, j, g in chunk_grads:
            shards[r][j] = g
    vit = next(v for _, v in parts if v is not None)
    return mcore_to_hf([merge_pp(s, tc, tied) for s in shards], tc), vit, shards


def run(family: str, tied: bool, tp: int, pp: int, vpp, m: int) -> None:
    bundle = tiny(family, tied)
    model = bundle.model
    tc = model.config.get_text_config()
    mbs = microbatches(bundle, m)
    hf = [float(hf_loss(model, mb)) for mb in mbs]

    pipeline.init_model_parallel(tp, pp, vpp)
    chunks = pipeline.build_chunks(tc, lm_state(model))
    losses = run_schedule(bundle, chunks, mbs)
    assert bool(losses) == ps.is_pipeline_last_stage(), (family, losses)
    grads, vit, shards = gathered(chunks, model, tc, tied, tp, pp)
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, losses)
    losses = next(x for x in box if x)
    if tied:  # the head copy on the last chunk got the embedding's whole gradient (finalize_grads)
        for s in shards:
            assert torch.equal(s[-1]["output_layer.weight"], s[0]["embedding.word_embeddings.weight"]), family

    check_against_pp1(bundle, mbs, hf, (family, tied, tp, pp, vpp), losses, grads, [vit])


def check_against_pp1(bundle, mbs, hf: list, case: tuple, losses: list, grads: dict, vits: list) -> None:
    """The pipelined run's losses (every micro-batch's, on every rank), decoder gradients (HF names, gathered) and
    ViT gradients (one dict per first-stage rank that has them) against PP=1 in this process and HF's losses."""
    model = bundle.model
    tc = model.config.get_text_config()
    pipeline.init_model_parallel(1, 1)  # PP=1, no TP: one process's whole model on every rank
    model.zero_grad(set_to_none=True)
    (one,) = pipeline.build_chunks(tc, lm_state(model))
    ref = run_schedule(bundle, [one], mbs)
    ref_grads = mcore_to_hf([{k: p.grad for k, p in one.named_parameters()}], tc)
    ref_vit = vit_grads(model)

    assert len(losses) == len(ref) == len(mbs), case
    for a, b, h in zip(losses, ref, hf):
        assert abs(a - b) <= LOSS_RTOL * abs(b) and abs(a - h) <= LOSS_RTOL * abs(h), (case, a, b, h)
    assert grads.keys() == ref_grads.keys(), case
    for k, g in ref_grads.items():
        assert relative_error(grads[k], g) <= GRAD_RTOL, (case, k, relative_error(grads[k], g))
    assert len(ref_vit) > 0, case
    for vit in vits:
        assert vit.keys() == ref_vit.keys(), case
        for k, g in ref_vit.items():
            assert relative_error(vit[k], g) <= GRAD_RTOL, (case, k, relative_error(vit[k], g))


def main() -> None:
    dist.init_process_group("gloo")
    for family, tied, tp, pp, vpp, m in CASES[sys.argv[1]]:
        run(family, tied, tp, pp, vpp, m)
        if dist.get_rank() == 0:
            print(f"ok {family}{' tied' if tied else ''} tp={tp} pp={pp} vpp={vpp} micro-batches={m}", flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process


if __name__ == "__main__":
    main()
