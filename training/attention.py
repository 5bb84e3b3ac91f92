"""`attn_implementation="sdpa_varlen"`: packed rows without an L x L mask, on CPU or any SDPA device.

A packed micro-batch is flattened to one [1, B*L] sequence whose samples (and each row's padding) are the
segments of `cu_seq_lens_q` (data/pack.py `varlen_inputs`: the kwargs flash-attention's varlen path takes).
Attention then runs per segment: segments of similar length (the same power-of-two length class) are gathered
into a [S, H, M, D] batch padded to the longest of them (M) and SDPA runs causally on it, with no mask (so SDPA
may pick its flash kernel). A query sees only keys of its own segment at or before it, and a segment's padding
lies after all its real positions, so causality alone hides it: the result is the block-diagonal causal
attention of the dense [B, 1, L, L] mask (equal to ~1e-6, tests/test_packing.py) with no O(L^2) mask (1 GiB
per 32K-token row) and at most 4x the work of sum(n_i^2) instead of B*L^2. Classes matter on mixed lengths:
padding every segment to the longest of the micro-batch made attention several times costlier on a mix of
12- to 227-token samples (training/bench.py).

Calls without `cu_seq_lens_q` (the ViT's per-image chunks, generation with a KV cache, padded batches) are
plain SDPA with the mask HF builds for "sdpa": the mask function is registered under this name too.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"
VARLEN = (NAME, "flash_attention_2", "flash_attention_3")  # implementations fed packed rows by cu_seqlens


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [S, M] into the flattened sequence, valid [S, M]) for segments (starts [S], lengths [S])."""
    pos = torch.arange(int(lengths.max()), device=lengths.device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + pos[None, :], starts[:, None])  # padding reads the segment start
    return index, valid


_last: list = [None, None, None]  # (cu_seq_lens, device, its classes): every layer of a forward passes the same cu


def _length_classes(cu: torch.Tensor, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(index, valid) of each group of non-empty segments whose lengths share a power-of-two class. Computed once
    per forward, not per layer: it reads lengths back to the host (a device sync on GPUs)."""
    if _last[0] is cu and _last[1] == device:
        return _last[2]
    c = cu.to(device=device, dtype=torch.long)
    starts, lengths = c[:-1], c[1:] - c[:-1]
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    cls = torch.ceil(torch.log2(lengths.double())).long()
    groups = [_segments(starts[cls == k], lengths[cls == k]) for k in torch.unique(cls).tolist()]
    _last[:] = [cu, device, groups]
    return groups


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None), as HF's SDPA interface returns."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or (cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError("sdpa_varlen takes one flattened sequence with the same segments for queries and keys")
    outs, positions = [], []
    for index, valid in _length_classes(cu_seq_lens_q, query.device):
        S, M = index.shape

        def gather(x):  # [1, H, T, D] -> [S, H, M, D]
            return x[0].index_select(1, index.reshape(-1)).view(x.shape[1], S, M, x.shape[-1]).transpose(0, 1)

        q, k, v = gather(query), gather(key), gather(value)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2)[valid])  # [real positions of the class, H, D]
        positions.append(index[valid])
    # one class holds every segment in order, so its positions are already in sequence order
    out = outs[0] if len(outs) == 1 else torch.cat(outs).index_select(0, torch.argsort(torch.cat(positions)))
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, sdpa_varlen_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
