"""The lm objective's weighted cross-entropy over a vocabulary-parallel head, chunk by chunk, nothing recomputed.

Each TP rank holds rows [r·V/tp, (r+1)·V/tp) of the (padded) output weight. Per chunk of supervised positions it
computes its own logits only; the softmax's max and normaliser and the target's logit are all-reduced over the
TP group as [chunk]-sized vectors (Megatron's vocab-parallel cross-entropy), so no rank ever holds a chunk's
whole [chunk, V] logits and nothing of size V crosses the network. The gradient (softmax - onehot, times the
token's weight) is taken in the forward, as training/vlm.py's `_FusedLinear` does for a plain head: d/dweight for
this rank's rows, d/dh summed over TP once at the end. Columns past the real vocabulary (padding) are -inf.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class VocabParallelNLL(torch.autograd.Function):
    """(Σ_i w_i·CE_i, CE [N] detached) of hidden states h [N, H] under a vocab-parallel weight shard [V/tp, H]."""

    @staticmethod
    def forward(ctx, h, weight, target, w, chunk: int, vocab: int, group):
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = weight.shape[0]
        lo = rank * rows
        valid = max(0, min(rows, vocab - lo))  # this shard's real (unpadded) columns
        n = len(target)
        ce = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        for s in range(0, n, chunk):
            hs, ts = h[s:s + chunk], target[s:s + chunk]
            z = (hs @ weight.t()).float()
            z[:, valid:] = float("-inf")
            m = z.max(-1).values
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            e = (z - m[:, None]).exp_()
            total = e.sum(-1)
            local = (ts >= lo) & (ts < lo + valid)
            idx = (ts - lo).clamp(0, max(rows - 1, 0))
            tz = torch.where(local, z.gather(-1, idx[:, None])[:, 0], torch.zeros_like(m))
            if tp > 1:
                both = torch.stack([total, tz])
                dist.all_reduce(both, group=group)
                total, tz = both[0], both[1]
            ce[s:s + chunk] = total.log() + m - tz
            g = e.div_(total[:, None])  # softmax over the whole vocabulary, this rank's columns
            g[local.nonzero()[:, 0], idx[local]] -= 1.0
            g = (g * w[s:s + chunk, None]).to(weight.dtype)
            grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ hs).float()
        if tp > 1:
            dist.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * w).sum(), ce

    @staticmethod
    def backward(ctx, g_loss, g_ce):
        grad_h, grad_w = ctx.saved_tensors
        dw = (grad_w * g_loss).to(ctx.w_dtype) if ctx.has_w else None
        return grad_h * g_loss.to(grad_h.dtype), dw, None, None, None, None, None
