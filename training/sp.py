"""Ulysses sequence parallelism for the VLM step: what an SP group does around the decoder.

An SP group (`parallel.sp_size` consecutive ranks) trains one micro-batch of packed rows together; every rank of
the group holds the same batch (the data loader runs one stream per data-parallel rank). The step (training/vlm.py)
then, on each rank:

1. pads the flattened [1, T] row to a multiple of sp_size (the padding is one more segment of `cu_seqlens`) and
   keeps its slice [a, b) of the tokens; the M-RoPE ids and the segment boundaries were computed by the packer on
   the whole row, so each token keeps its global position;
2. runs the ViT: `split` (default) encodes this rank's share of the row's whole images/videos (contiguous, balanced
   by visual-token count) and all-gathers the merged and DeepStack features, so each image is encoded once in the
   group; `replicate` encodes all of them on every rank. Either way the slice's placeholders get their features;
3. runs the decoder on its slice; attention is the one place that needs the whole sequence: the engine installs an
   all-to-all around the text attention (DeepSpeed's UlyssesSPAttentionHF: [T/sp, all heads] -> [T, heads/sp]),
   and the attention inside is the varlen kernel on the full `cu_seqlens` (samples stay apart). The ViT's own
   attention goes through the plain function (`route_attention` routes by module);
4. computes its slice's log-probs / CE, and puts them back into the full [B, L-1] layout with `gather_tokens`,
   whose backward is the identity: every rank of the group then holds the same per-token values (any per-sample
   loss, e.g. DPO's, is exact) and sends back the gradient of its own slice only, so the ranks' parameter gradients
   sum to the gradient of the one loss. The engine sums gradients over all ranks (it undoes DeepSpeed's averaging
   over every process), and the loop counts each group's data once (`owner`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from data.encode import IGNORE


class _SumAcross(torch.autograd.Function):
    """Forward: the group's sum. Backward: the identity. For values every rank then uses identically: each rank's
    gradient reaches only its own contribution, and the parameter gradients are summed over the ranks later."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherRows(torch.autograd.Function):
    """Forward: the ranks' row blocks (sizes `counts`, in rank order) concatenated on every rank. Backward: the
    gradients of all copies of this rank's rows summed over the group (each rank used the rows of its own slice)."""

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        width = max(counts)
        pad = x.new_zeros((width, *x.shape[1:]))
        pad[:len(x)] = x
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        start = sum(ctx.counts[:ctx.rank])
        return g[start:start + ctx.counts[ctx.rank]], None, None, None


def share(tokens: list[int], size: int) -> list[int]:
    """The SP rank that encodes each image: contiguous runs balanced by visual-token count (an image goes to the
    rank whose 1/size of the total holds its middle token)."""
    total, out, before = max(1, sum(tokens)), [], 0
    for n in tokens:
        out.append(min(size - 1, int((before + n / 2) * size // total)))
        before += n
    return out


class SequenceParallel:
    """One rank's part of an SP group for a VLM (training/vlm.py calls these in its step)."""

    def __init__(self, group, vision: str = "split"):
        self.group, self.vision = group, vision
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.T = self.Tp = self.a = self.b = 0

    # -- 1. the row and this rank's slice of it -----------------------------------------------------------------
    def shard_row(self, batch: dict, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, dict]:
        """(this rank's token ids [1, n], its decoder inputs) of the flattened packed row ids [1, T]."""
        T = ids.shape[1]
        n = -(-T // self.size)
        self.T, self.Tp, self.a, self.b = T, n * self.size, self.rank * n, (self.rank + 1) * n
        extra = self.Tp - T
        self.ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
        cu = batch["cu_seqlens"].to(ids.device)
        if extra:  # the padding is a causal segment of its own
            cu = torch.cat([cu, cu.new_tensor([self.Tp])])
        lengths = (cu[1:] - cu[:-1]).long()
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        text = torch.arange(self.Tp, device=ids.device) - starts  # 0.. restarting at every segment
        mrope = torch.nn.functional.pad(batch["position_ids"].to(ids.device).reshape(3, T), (0, extra))
        # 4 rows: the text row (the positions Ulysses gathers) above the M-RoPE rows; an all-ones mask so HF builds
        # no mask (attention is varlen by cu_seqlens on the whole row, after the all-to-all)
        position_ids = torch.cat([text[None], mrope])[:, self.a:self.b].reshape(4, 1, n)
        longest = int(lengths.max())
        return self.ids[:, self.a:self.b], dict(
            position_ids=position_ids, attention_mask=torch.ones(1, n, dtype=torch.long, device=ids.device),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)

    # -- 2. visual features ---------------------------------------------------------------------------------------
    def encode_shares(self, encode, media: list, merge: int, hidden: int, depth: int, dummy, dtype: torch.dtype,
                      needs_grad: bool) -> tuple[dict, torch.Tensor]:
        """({modality: (features [n, H], DeepStack features per layer or None)} of every image/video of the row, in
        placeholder order, each encoded by one rank of the group; a zero scalar of dummy passes). `media`: (modality,
        pixels, grids) of the modalities in the batch; `encode(modality, pixels, grids)` is the family's ViT + merger.
        Each row is `hidden` features and `depth` DeepStack layers' features. A rank without a share of a modality
        runs `dummy()` (0 x the ViT: the same collectives, zero gradients). `needs_grad`: the features get
        gradients (the same on every rank: grad mode and trainable ViT/merger).
        All modalities go through one gather, so every rank runs its backward collective at the same point."""
        local, zero, counts = [], None, []  # counts[m][r]: features of modality m encoded by rank r
        for modality, pixels, grids in media:
            patches = grids.prod(-1).tolist()
            tokens = [p // merge ** 2 for p in patches]
            owner = share(tokens, self.size)
            counts.append([sum(t for t, r in zip(tokens, owner) if r == k) for k in range(self.size)])
            mine = [i for i, r in enumerate(owner) if r == self.rank]
            if mine:
                start = sum(patches[:mine[0]])
                enc = encode(modality, pixels[start:start + sum(patches[i] for i in mine)], grids[mine[0]:mine[-1] + 1])
                ds = getattr(enc, "deepstack_features", None) or []
                local.append(torch.cat([torch.cat(list(enc.pooler_output)), *(torch.cat(layer) for layer in ds)], 1))
            else:
                z = dummy()
                zero = z if zero is None else zero + z
        device = media[0][1].device
        if local:
            flat = torch.cat(local)
        else:  # in the graph like the other ranks' features, so that every rank runs the gather's backward
            flat = torch.zeros((0, hidden * (1 + depth)), dtype=dtype, device=device, requires_grad=needs_grad)
        full = _GatherRows.apply(flat, [sum(c[r] for c in counts) for r in range(self.size)], self.rank, self.group)
        out = {}
        for m, (modality, _, _) in enumerate(media):  # rank-major rows -> this modality's, in image order
            index = []
            for r in range(self.size):
                at = sum(sum(c[q] for c in counts) for q in range(r)) + sum(c[r] for c in counts[:m])
                index += range(at, at + counts[m][r])
            rows = full.index_select(0, torch.tensor(index, dtype=torch.long, device=full.device))
            parts = list(rows.split(hidden, 1))
            out[modality] = (parts[0], parts[1:] or None)
        if zero is None:
            zero = full.new_zeros((), dtype=torch.float32)
        return out, zero

    def local_features(self, features: dict, token_ids: dict) -> dict:
        """The row's features (per modality, in placeholder order) cut to this rank's slice."""
        out = {}
        for modality, (feats, ds) in features.items():
            is_tok = self.ids[0] == token_ids[modality]
            start, n = int(is_tok[:self.a].sum()), int(is_tok[self.a:self.b].sum())
            out[modality] = (feats[start:start + n], [layer[start:start + n] for layer in ds] if ds else None)
        return out

    # -- 4. per-token outputs -------------------------------------------------------------------------------------
    def targets(self, labels: torch.Tensor, weights: torch.Tensor | None):
        """This rank's next-token targets [1, n] (IGNORE where none: each row's last position, the padding) and
        their loss weights, cut from the whole row's."""
        B, L = labels.shape
        target = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE)], 1).reshape(1, B * L)
        target = torch.nn.functional.pad(target, (0, self.Tp - self.T), value=IGNORE)[:, self.a:self.b]
        if weights is None:
            return target, None
        w = torch.cat([weights, weights.new_zeros((B, 1))], 1).reshape(1, B * L)
        return target, torch.nn.functional.pad(w, (0, self.Tp - self.T))[:, self.a:self.b]

    def gather_tokens(self, local: torch.Tensor, B: int, L: int) -> torch.Tensor:
        """This rank's per-token values [1, n] -> the whole batch's [B, L-1] on every rank (backward: identity)."""
        full = local.new_zeros((1, self.Tp))
        full = torch.cat([full[:, :self.a], local, full[:, self.b:]], 1)
        return _SumAcross.apply(full, self.group)[0, :self.T].view(B, L)[:, :-1]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumAcross.apply(x, self.group)


# -- attention routing ----------------------------------------------------------------------------------------
_ROUTED: dict = {}


def route_attention(impl: str) -> None:
    """Makes HF's attention function `impl` call a module's own `sp_attention` (the engine's Ulysses wrapper) when
    it has one (the decoder's attention layers), and the plain function otherwise (the ViT's). The name stays
    `impl`, so HF's per-implementation code paths (masks, flash kwargs) are unchanged."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in _ROUTED:
        return
    plain = ALL_ATTENTION_FUNCTIONS[impl]

    def routed(module, query, key, value, attention_mask, *args, **kwargs):
        sp = module.__dict__.get("sp_attention")
        if sp is None:
            return plain(module, query, key, value, attention_mask, *args, **kwargs)
        # the mask HF built is for this rank's slice; attention runs on the whole row by cu_seqlens
        return sp(module, query, key, value, None, *args, **kwargs)

    _ROUTED[impl] = plain
    AttentionInterface.register(impl, routed)


def plain_attention(impl: str):
    """The attention function `impl` as it was before routing (what the Ulysses wrapper calls inside)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return _ROUTED.get(impl) or ALL_ATTENTION_FUNCTIONS[impl]


def enable(vlm, group, vision: str, attention) -> None:
    """Turns `vlm` (training/vlm.py VLM) into an SP-group member: its step shards rows over `group`, and its decoder
    attention layers call `attention(module, q, k, v, mask, **kw)` (the engine's all-to-all wrapper)."""
    impl = vlm.config.get_text_config()._attn_implementation
    route_attention(impl)
    vlm.sp = SequenceParallel(group, vision)
    for layer in vlm.model.language_model.layers:
        layer.self_attn.__dict__["sp_attention"] = attention  # not a child module: no parameters, no hooks
