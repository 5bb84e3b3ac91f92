"""The megatron Decoder with sequence parallelism (TP=2, `sequence_parallel=True`) against HF and against PP=1
(run under torchrun, gloo, CPU).

`torchrun --nproc-per-node=2 mcore_sp.py tp2` (one launch, every case): every rank builds the same tiny HF model
and inputs and computes the HF reference itself; the Decoder's weights are `hf_to_mcore(..., tp=2, rank)`, its
config `transformer_config(..., sequence_parallel=True)`. Per case (the three families on tests/test_mcore.py's
packed row, image + text + video, DeepStack for Qwen3-VL; Qwen3-VL on three padded rows, DeepStack over several
rows; Qwen2.5-VL tied): the layers really ran on half the sequence (a hook on the first layer), the final hidden
states (full on every rank) and the logits gathered over the vocab shards equal HF's, and after backward of
sum(logits * w) (each rank its own vocab shard) and `reduce_tp_partial_grads` every gradient (both ranks' converted
back by `mcore_to_hf`) equals HF's, as do, on each rank alone, the gradients of the decoder's input embeddings and
of the DeepStack features (what the replicated ViT gets). An odd length (47) is refused ("ok ... refused").

`torchrun --nproc-per-node=4 mcore_sp.py tp2pp2`: TP=2 x PP=2 (1F1B, Qwen3-VL tied) and TP=2 x PP=2 x VPP=2
(interleaved, Qwen3-VL) with sequence parallelism against PP=1 in one process (no TP) and HF, as
tests/dist/mcore_pp.py: the loss sums, every decoder gradient by HF name, and the ViT's gradients on both TP ranks
of the first stage (DeepStack features cross the stages as each rank's slice); a length not divisible by tp is
refused before the schedule runs.
Prints "ok <case>" per case.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mcore import (ATOL, GRAD_RTOL, lm_state, logit_weights, packed_case, padded_case,  # noqa: E402
                        relative_error, tiny)
from test_mcore_pp import hf_loss, microbatches, run_schedule, vit_grads  # noqa: E402
from mcore_pp import check_against_pp1, gathered  # noqa: E402
from mcore_tp import check_grads_against_hf  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from training.mcore import pipeline, shim  # noqa: E402
from training.mcore.convert import hf_to_mcore  # noqa: E402
from training.mcore.model import Decoder, transformer_config  # noqa: E402
from training.vlm import VLM  # noqa: E402

TP = 2


def _leaf_deepstack(case) -> dict:
    """The case's DeepStack kwargs with the features as fresh leaves that take gradients."""
    ds = case["deepstack"]
    if not ds:
        return {}
    return dict(ds, deepstack_visual_embeds=[e.detach().clone().requires_grad_()
                                             for e in ds["deepstack_visual_embeds"]])


def hf_run(model, case):
    """(hidden, logits, input embeddings, DeepStack kwargs) of HF; the embeddings and features keep their grads."""
    embeds, _ = VLM(model).merge(case["ids"], model.get_input_embeddings()(case["ids"]), case["feats"])
    embeds.retain_grad()
    ds = _leaf_deepstack(case)
    hidden = model.model.language_model(input_ids=None, inputs_embeds=embeds, use_cache=False, **case["hf"],
                                        **ds).last_hidden_state
    return hidden, model.lm_head(hidden), embeds, ds


def mc_run(model, dec, case):
    embeds, _ = VLM(model).merge(case["ids"], dec.embed(case["ids"]), case["feats"])
    embeds.retain_grad()
    ds = _leaf_deepstack(case)
    hidden = dec(embeds, **case["mc"], **ds)
    return hidden, dec.logits(hidden), embeds, ds


def run(family: str, tied: bool, padded: bool, rank: int) -> None:
    bundle = tiny(family, tied)
    model = bundle.model
    tc = model.config.get_text_config()
    vocab = tc.vocab_size
    dec = Decoder(tc, config=transformer_config(tc, TP, perform_initialization=False, sequence_parallel=True),
                  tied=tied)
    dec.load(hf_to_mcore(model.state_dict(), tc, TP, rank))
    tagged = [k for k, p in dec.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert "decoder.final_layernorm.weight" in tagged and len(tagged) >= 2 * tc.num_hidden_layers + 1, tagged
    case = (padded_case if padded else packed_case)(bundle)
    L = case["ids"].shape[1]
    seen = []
    dec.decoder.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[0]),
                                                    with_kwargs=True)
    if case["deepstack"] and not padded:  # both ranks' slices hold visual tokens: the selection matters on each
        vis = case["deepstack"]["visual_pos_masks"]
        assert all(vis[:, r * L // TP:(r + 1) * L // TP].any() for r in range(TP)), vis.nonzero()
    w = logit_weights(case, vocab)
    v = case["valid"]

    hidden, logits, hf_embeds, hf_ds = hf_run(model, case)
    (logits * w).sum().backward()
    mh, local, mc_embeds, mc_ds = mc_run(model, dec, case)
    assert seen == [L // TP], (seen, L)  # the layers ran on this rank's half of the sequence
    shard = local.shape[-1]  # this rank's vocabulary: ids rank*shard .. (rank+1)*shard, padded past `vocab`
    w_local = torch.nn.functional.pad(w, (0, shard * TP - vocab))[..., rank * shard:(rank + 1) * shard]
    (local * w_local).sum().backward()

    assert mh.shape == hidden.shape and (mh - hidden)[v].abs().max() <= ATOL, (family, "hidden")
    parts = [torch.empty_like(local) for _ in range(TP)]
    dist.all_gather(parts, local.detach().contiguous())
    gathered_logits = torch.cat(parts, -1)
    assert (gathered_logits[..., :vocab] - logits)[v].abs().max() <= ATOL, (family, "logits")
    assert (gathered_logits[..., vocab:] == 0).all()

    # what the replicated ViT and merge get, on this rank alone: the whole gradient (as without SP)
    assert relative_error(mc_embeds.grad, hf_embeds.grad) <= GRAD_RTOL, (family, "inputs_embeds")
    for k, (a, b) in enumerate(zip(mc_ds.get("deepstack_visual_embeds", []), hf_ds.get("deepstack_visual_embeds", []))):
        assert relative_error(a.grad, b.grad) <= GRAD_RTOL, (family, "deepstack", k, relative_error(a.grad, b.grad))

    dec.reduce_tp_partial_grads()  # q/k norms (heads) and the sequence-parallel norms (sequence slices)
    check_grads_against_hf(dec, model, family, tied)


def refused(rank: int) -> None:
    """Qwen2-VL's padded rows are 47 long: an odd length is refused, naming it and tp, on every rank alike."""
    bundle = tiny("qwen2_vl")
    model = bundle.model
    tc = model.config.get_text_config()
    dec = Decoder(tc, config=transformer_config(tc, TP, perform_initialization=False, sequence_parallel=True))
    dec.load(hf_to_mcore(model.state_dict(), tc, TP, rank))
    case = padded_case(bundle)
    assert case["ids"].shape[1] == 47
    try:
        mc_run(model, dec, case)
    except ValueError as e:
        assert "sequence length 47" in str(e) and "tensor-parallel size 2" in str(e), e
    else:
        raise AssertionError("an odd sequence length was not refused")


def tp2() -> None:
    rank = dist.get_rank()
    shim.init_model_parallel(TP)
    for family, tied, padded in (("qwen2_vl", False, False), ("qwen2_5_vl", False, False), ("qwen3_vl", False, False),
                                 ("qwen3_vl", False, True), ("qwen2_5_vl", True, False)):
        run(family, tied, padded, rank)
        if rank == 0:
            print(f"ok {family}{' tied' if tied else ''} {'padded' if padded else 'packed'}", flush=True)
    refused(rank)
    if rank == 0:
        print("ok odd length refused", flush=True)
    shim.destroy(False)


def pp_run(family: str, tied: bool, tp: int, pp: int, vpp, m: int) -> None:
    """tests/dist/mcore_pp.py `run` with sequence parallelism, and the ViT's gradients of every first-stage rank."""
    bundle = tiny(family, tied)
    model = bundle.model
    tc = model.config.get_text_config()
    mbs = microbatches(bundle, m)
    hf = [float(hf_loss(model, mb)) for mb in mbs]

    pipeline.init_model_parallel(tp, pp, vpp)
    chunks = pipeline.build_chunks(tc, lm_state(model), sequence_parallel=True)
    assert all(c.config.sequence_parallel for c in chunks)
    losses = run_schedule(bundle, chunks, mbs)
    grads, _, _ = gathered(chunks, model, tc, tied, tp, pp)
    vits = [None] * dist.get_world_size()
    dist.all_gather_object(vits, vit_grads(model) if ps.is_pipeline_first_stage() else None)
    vits = [v for v in vits if v is not None]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, losses)
    losses = next(x for x in box if x)

    assert len(vits) == tp, (family, tp)  # the first stage's TP ranks
    check_against_pp1(bundle, mbs, hf, (family, tied, tp, pp, vpp), losses, grads, vits)


def pp_refused() -> None:
    bundle = tiny("qwen3_vl")
    tc = bundle.model.config.get_text_config()
    pipeline.init_model_parallel(2, 2)
    chunks = pipeline.build_chunks(tc, lm_state(bundle.model), sequence_parallel=True)
    try:
        pipeline.forward_backward(chunks, None, [], seq_length=127)
    except ValueError as e:
        assert "sequence length 127" in str(e), e
    else:
        raise AssertionError("seq_length 127 at tp=2 was not refused")


def tp2pp2() -> None:
    for family, tied, tp, pp, vpp, m in (("qwen3_vl", True, 2, 2, None, 3), ("qwen3_vl", False, 2, 2, 2, 4)):
        pp_run(family, tied, tp, pp, vpp, m)
        if dist.get_rank() == 0:
            print(f"ok {family}{' tied' if tied else ''} tp={tp} pp={pp} vpp={vpp} sequence parallel", flush=True)
    pp_refused()
    if dist.get_rank() == 0:
        print("ok odd seq_length refused", flush=True)
    ps.destroy_model_parallel()


def main() -> None:
    dist.init_process_group("gloo")
    {"tp2": tp2, "tp2pp2": tp2pp2}[sys.argv[1]]()
    dist.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process


if __name__ == "__main__":
    main()
