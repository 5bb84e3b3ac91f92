"""The Qwen3-VL-MoE Decoder at expert-parallel size 2 against EP=1 and HF (run under torchrun, 2 processes, gloo).

`torchrun --nproc-per-node=2 mcore_moe.py`. Every rank builds the same tiny HF model and the same two packed rows
(tests/test_mcore_moe.py `rows`); rank r trains row r (the two ranks are data-parallel; at EP=2 each also holds two
of the four experts). Per layout, on a fresh parallel state (shim.init_model_parallel(1, ep=...)):

1. the Decoder with `hf_to_mcore(..., ep, ep_rank)`, the summed cross-entropy of the rank's row, one backward;
   gradients reduced as megatron's DDP does: the experts' (`Decoder.expert_parallel`) over the expert-data-parallel
   group, the rest over the data-parallel group; the losses summed over the ranks;
2. the gradients of both ranks gathered, `merge_ep` over the EP ranks, `mcore_to_hf`.
Checked: EP=1's loss equals HF's over both rows, its gradients HF's (by HF name; the experts' expert by expert);
EP=2's loss and every gradient equal EP=1's ("ok ep1", "ok ep2"); at EP=2 each rank routed tokens of every MoE
layer to the other rank's experts and received tokens from it ("ok ep2 crossing"); and with the two ranks' experts
swapped (each loads the other's) the loss and the gradients move far past the tolerances ("ok ep2 misassigned":
the comparison sees a mis-assignment).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_mcore import GRAD_RTOL, hf_forward, lm_state, relative_error  # noqa: E402
from test_mcore_moe import ce, compare_grads, mc_loss, recorded, rows, tiny_moe  # noqa: E402
from test_mcore_pp import LOSS_RTOL  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from training.mcore import shim  # noqa: E402
from training.mcore.convert import hf_to_mcore, mcore_to_hf, merge_ep  # noqa: E402
from training.mcore.model import Decoder  # noqa: E402


def step(bundle, mbs, ep: int, swap: bool = False):
    """(loss summed over the ranks, gradients by HF name, {layer: (assignments sent to, received from the other
    rank)}) of one forward/backward at expert-parallel size `ep`; `swap`: each EP rank loads the other's experts."""
    model = bundle.model
    tc = model.config.get_text_config()
    shim.init_model_parallel(1, ep=ep)
    r, ep_rank = dist.get_rank(), ps.get_expert_model_parallel_rank()
    dec = Decoder(tc)
    dec.load(hf_to_mcore(lm_state(model), tc, 1, 0, ep=ep, ep_rank=(ep - 1 - ep_rank) if swap else ep_rank))
    with recorded(dec) as route:
        loss = mc_loss(model, dec, mbs[r])
    loss.backward()
    for p in dec.parameters():
        dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group() if dec.expert_parallel(p)
                        else ps.get_data_parallel_group())
    total = loss.detach().clone()
    dist.all_reduce(total)
    n_local = tc.num_experts // ep
    crossing = {}
    for layer, (_, _, experts) in route.items():
        sent = int((experts // n_local != ep_rank).sum())
        got = torch.tensor([sent])
        dist.all_reduce(got)  # at ep=2 on 2 ranks: what this rank sent plus what it received
        crossing[layer] = (sent, int(got) - sent)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (ep_rank, {k: p.grad for k, p in dec.named_parameters()}))
    by_ep = dict(parts)  # EP rank -> gradients (the data-parallel replicas are equal after the reduction)
    grads = mcore_to_hf([merge_ep([by_ep[e] for e in range(ep)], tc)], tc)
    ps.destroy_model_parallel()
    return float(total), grads, crossing


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bundle = tiny_moe()
    model = bundle.model
    mbs = rows(bundle, 2)
    hf = 0.0  # HF's loss over both rows and its gradients, on the stored (no-grad) ViT features
    for mb in mbs:
        loss = ce(hf_forward(model, mb)[1], mb)
        loss.backward()
        hf += float(loss.detach())
    hf_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    loss1, grads1, _ = step(bundle, mbs, ep=1)
    assert abs(loss1 - hf) <= LOSS_RTOL * abs(hf), (loss1, hf)
    assert set(grads1) >= set(hf_grads)
    compare_grads(grads1, hf_grads, "ep1 vs HF")
    if rank == 0:
        print("ok ep1", flush=True)

    loss2, grads2, crossing = step(bundle, mbs, ep=2)
    assert abs(loss2 - loss1) <= LOSS_RTOL * abs(loss1), (loss2, loss1)
    assert grads2.keys() == grads1.keys()
    compare_grads(grads2, grads1, "ep2 vs ep1")
    if rank == 0:
        print("ok ep2", flush=True)
    assert sorted(crossing) == [0, 1, 2, 3] and all(s > 0 and g > 0 for s, g in crossing.values()), crossing
    if rank == 0:
        print("ok ep2 crossing", flush=True)

    # the tiny random model's loss is mostly log(vocab): swapped experts move it by ~1e-4, 10x the tolerance
    loss_swapped, grads_swapped, _ = step(bundle, mbs, ep=2, swap=True)
    assert relative_error(torch.tensor(loss_swapped), torch.tensor(loss1)) > 10 * LOSS_RTOL, (loss_swapped, loss1)
    assert max(relative_error(grads_swapped[k], g) for k, g in grads1.items()) > 1e4 * GRAD_RTOL
    if rank == 0:
        print("ok ep2 misassigned", flush=True)
    dist.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process


if __name__ == "__main__":
    main()
