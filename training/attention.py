"""`attn_implementation="sdpa_varlen"`: packed rows without an L x L mask, on CPU or any SDPA device.

A packed micro-batch is flattened to one [1, B*L] sequence whose samples (and each row's padding) are the
segments of `cu_seq_lens_q` (data/pack.py `varlen_inputs`: the kwargs flash-attention's varlen path takes).
Attention then runs per segment: the segments are gathered into a [S, H, M, D] batch padded to the longest one
(M) and SDPA runs causally on it, with no mask (so SDPA may pick its flash kernel). A query sees only keys of
its own segment at or before it, and a segment's padding lies after all its real positions, so causality alone
hides it: the result is the block-diagonal causal attention of the dense [B, 1, L, L] mask (equal to ~1e-6,
tests/test_packing.py) at S*M^2 instead of B*L^2 work and with no O(L^2) mask, which at 32K tokens per row
would be 1 GiB per row.

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


def _segments(cu: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [S, M] into the flattened sequence, valid [S, M]) for segment boundaries cu [S + 1]."""
    cu = cu.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(int(lengths.max()), device=device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, cu[:-1, None] + pos[None, :], cu[:-1, None])  # padding reads the segment start
    return index, valid


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None), as HF's SDPA interface returns."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or (cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError("sdpa_varlen takes one flattened sequence with the same segments for queries and keys")
    index, valid = _segments(cu_seq_lens_q, query.device)
    S, M = index.shape

    def gather(x):  # [1, H, T, D] -> [S, H, M, D]
        return x[0].index_select(1, index.reshape(-1)).view(x.shape[1], S, M, x.shape[-1]).transpose(0, 1)

    q, k, v = gather(query), gather(key), gather(value)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[valid].unsqueeze(0), None  # valid positions in sequence order


AttentionInterface.register(NAME, sdpa_varlen_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
