"""The model step, top to bottom: visual encoding -> merge into the text embeddings -> decoder -> token log-probs.

`VLM` wraps an HF Qwen-VL `*ForConditionalGeneration` without copying it: its children are the HF model's own
`model` and `lm_head`, so parameter names (and checkpoints, groups, exports) are the HF names. Engines wrap a
`VLM`; a forward is `model(batch)` and returns per-token log-probs of the batch's labels, never logits:

1. **Visual encoding**: each modality's pixels through the family's ViT + merger (`get_image_features` /
   `get_video_features`: per-grid merged features and, for Qwen3-VL, the DeepStack features). Rollout rows that
   share a prompt store its images once (`visual_owner`: row -> prompt, `visual_counts`: grids per prompt and
   modality); each distinct image is encoded once and its features are tiled over the rows, so the gradient of
   a shared image is the sum over its rows.
   A micro-batch without media runs the ViT on one dummy 2x2-patch image and adds 0 x its output to the result.
   Under ZeRO-3 every module's forward all-gathers its parameters, so a rank that skipped the ViT while another
   ran it would hang; the dummy keeps every rank's collectives in step (same order: text embedding, then ViT),
   with zero gradient and no effect on the numbers.
2. **Merge**: the features replace the placeholder tokens' embeddings (image, then video); the visual-position
   mask and the DeepStack features (image and video joined in sequence order) go to the decoder. What differs
   between the families is data (token ids in the config, DeepStack features present or not), not a branch here.
3. **Decoder**: the HF text model on `inputs_embeds` with the packed M-RoPE ids; packed rows are one flattened
   sequence cut by `cu_seqlens` (training/attention.py), rollout rows are right-padded with a 2-D mask.
4. **Loss from hidden states**: lm_head on the supervised positions only, `loss_chunk` tokens at a time, fp32
   log-softmax per chunk; no [L, V] logits exist, only one chunk's. The lm objective's weighted CE
   (`weighted_nll`) computes each chunk's gradients in the forward, so nothing is recomputed; log-probs for other
   losses (`token_logps`: DPO, RL) recompute each chunk in backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from data.encode import IGNORE
from data.pack import varlen_inputs

# (modality, pixel key, grid key, placeholder-token id in the config)
MODALITIES = (("image", "pixel_values", "image_grid_thw", "image_token_id"),
              ("video", "pixel_values_videos", "video_grid_thw", "video_token_id"))
CHUNK_BYTES = 256 * 2**20  # fp32 logits of one loss chunk when model.loss_chunk=0


class VLM(torch.nn.Module):
    """The training step's module over an HF Qwen-VL model (its `model` and `lm_head`, shared, not copied)."""

    def __init__(self, hf: PreTrainedModel, loss_chunk: int = 0):
        super().__init__()
        self.model, self.lm_head = hf.model, hf.lm_head
        self.__dict__["hf"] = hf  # for generation and export; not a child, so every parameter is registered once
        vocab = hf.config.get_text_config().vocab_size
        self.loss_chunk = loss_chunk or max(1, CHUNK_BYTES // (4 * vocab))
        self.sync_group = None  # set by an engine whose lm_head calls are collectives (ZeRO-3): see `_chunks`
        self.sp = None  # training/sp.py SequenceParallel, set by an engine with parallel.sp_size > 1
        self.offload_activations = False  # model.offload_activations: tensors saved for backward in host memory
        self.pipeline_input = False  # a later pipeline stage: the decoder's input comes from the previous stage
        self.router_logits_to = None  # a MoE model's router statistics (training/moe.py): each forward's logits

    @property
    def config(self):
        return self.hf.config

    def forward(self, batch: dict, entropy: bool = False, nll: bool = False, weights: torch.Tensor | None = None,
                loss_fn=None, hidden: bool = False):
        """(log p(labels[:, t+1] | ...) [B, L-1], 0 where unsupervised, or with `nll` the cross-entropy -log p;
        the detached entropy there, if asked). With `weights` [B, L-1] (the lm objective): (Σ weights·CE, the
        detached CE) by `weighted_nll`, whose gradients need no recomputed logits; with `loss_fn` as well, any
        per-token loss of the logits instead of CE (`chunked_loss`: distillation). `hidden`: the final hidden
        states of the supervised positions [N, H] (a teacher's, for a student's `loss_fn`). Under sequence
        parallelism each rank computes its slice and every rank returns the whole batch's values (training/sp.py)."""
        B, L = batch["input_ids"].shape
        with save_on_cpu(pin_memory=torch.cuda.is_available()) if self.offload_activations else nullcontext():
            states, zero = self.hidden_states(batch)
        if self.sp is None:
            sup, h, t = _supervised(states, batch["labels"])
        else:  # states is this rank's slice [1, n, H]; its targets are cut from the whole row's
            if hidden or loss_fn is not None:
                raise ValueError("this objective does not run under sequence parallelism; set parallel.sp_size=1")
            target, weights = self.sp.targets(batch["labels"], weights)
            sup = target != IGNORE
            h, t = states[sup], target[sup]
        if hidden:
            return h, zero
        n = _chunks(len(t), self.loss_chunk, states.device, self.sync_group)
        if loss_fn is not None:
            loss, per_token, stats = chunked_loss(self.lm_head, h, t, weights[sup].float(), n, self.loss_chunk,
                                                  loss_fn, fused=self.sync_group is None)
            return loss + zero, _scatter(sup, per_token), stats
        if weights is not None:
            loss, ce = _weighted_nll(self.lm_head, sup, h, t, weights, n, self.loss_chunk, self.sync_group)
            if self.sp is not None:
                loss, ce = self.sp.sum(loss), self.sp.gather_tokens(ce, B, L)
            return loss + zero, ce
        out, ent = _logps(self.lm_head, sup, h, t, n, self.loss_chunk, entropy, nll)
        if self.sp is not None:
            out = self.sp.gather_tokens(out, B, L)
            ent = None if ent is None else self.sp.gather_tokens(ent, B, L)
        return out + zero, ent

    def hidden_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [B, L, H] (under sequence parallelism: this rank's slice [1, n, H] of the flattened
        row), a zero scalar carrying dummy ViT passes) of a micro-batch in the data/README.md contract."""
        B, L = batch["input_ids"].shape
        out, zero = self.decoder_output(batch)
        hidden = out.last_hidden_state
        return (hidden if self.sp is not None else hidden.view(B, L, -1)), zero

    def decoder_output(self, batch: dict):
        """Steps 1-3: (the text decoder's output, the dummy-ViT zero). On a later pipeline stage (`pipeline_input`:
        engine=megatron with engine.pp > 1) the decoder's input is the previous stage's output, so the embedding,
        ViT and merge run on the first stage only; what a non-last stage's decoder returns is what it sends on."""
        B, L = batch["input_ids"].shape
        packed = batch.get("attention_mask") is None and batch.get("cu_seqlens") is not None
        ids = batch["input_ids"].reshape(1, B * L) if packed else batch["input_ids"]
        decoder_inputs = None
        if self.pipeline_input:
            out = self.model.language_model(input_ids=ids, inputs_embeds=None, use_cache=False,
                                            **self.decoder_inputs(batch, ids, None, packed))
            return out, torch.zeros((), device=ids.device)
        if self.sp is not None:
            if not packed:
                raise ValueError("sequence parallelism (parallel.sp_size > 1) runs on packed rows only; this "
                                 "micro-batch is padded rows (rollouts): set parallel.sp_size=1 for this stage")
            pad = self.config.get_text_config().pad_token_id
            ids, decoder_inputs = self.sp.shard_row(batch, ids, 0 if pad is None else pad)
        embeds = self.model.get_input_embeddings()(ids)
        features, zero = self.encode_visual(batch)
        if self.sp is not None:
            features = self.sp.local_features(
                features, {m: getattr(self.model.config, key) for m, _, _, key in MODALITIES})
        embeds, deepstack = self.merge(ids, embeds, features)
        if decoder_inputs is None:
            decoder_inputs = self.decoder_inputs(batch, ids, embeds, packed)
        routed = {"output_router_logits": True} if self.router_logits_to is not None else {}
        out = self.model.language_model(input_ids=None, inputs_embeds=embeds, use_cache=False, **decoder_inputs,
                                        **deepstack, **routed)
        if routed:  # per MoE layer [tokens, E], in the graph: the load-balancing loss's statistics
            self.router_logits_to(out.router_logits)
        return out, zero

    # -- 1. visual encoding --------------------------------------------------------------------------------
    def encode(self, modality: str, pixels: torch.Tensor, grids: torch.Tensor):
        """The family's ViT + merger: per-grid merged features (and per-layer, per-grid DeepStack features)."""
        fn = self.model.get_image_features if modality == "image" else self.model.get_video_features
        return fn(pixels, grids, return_dict=True)

    def encode_visual(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """({modality: (features [n, H], DeepStack features per layer or None)} for the batch's media, in the order
        of the placeholder tokens (rows sharing a prompt's images get them tiled); a zero scalar carrying the dummy
        ViT pass of a micro-batch without media (or of an SP rank without a share of them)."""
        present = [(col, m) for col, m in enumerate(MODALITIES) if batch.get(m[1]) is not None]
        if not present:
            return {}, self.dummy_vision()
        if self.sp is not None and self.sp.vision == "split":  # each image encoded by one rank of the SP group
            visual = self.model.visual
            depth = len(getattr(visual.config, "deepstack_visual_indexes", None) or [])
            return self.sp.encode_shares(self.encode, [(m, batch[pix], batch[grid]) for _, (m, pix, grid, _) in present],
                                         visual.config.spatial_merge_size, self.config.get_text_config().hidden_size,
                                         depth, self.dummy_vision, next(visual.parameters()).dtype,
                                         torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters()))
        out = {}
        for col, (modality, pix_key, grid_key, _) in present:
            enc = self.encode(modality, batch[pix_key], batch[grid_key])
            if batch.get("visual_owner") is not None:
                enc = tile_features(enc, tile_order(batch["visual_counts"][:, col], batch["visual_owner"]))
            ds = getattr(enc, "deepstack_features", None)
            out[modality] = (torch.cat(list(enc.pooler_output)), [torch.cat(layer) for layer in ds] if ds else None)
        return out, next(iter(out.values()))[0].new_zeros((), dtype=torch.float32)

    def dummy_vision(self) -> torch.Tensor:
        """0 x the ViT (and every merger) on a minimal image: the vision collectives of a media-less micro-batch."""
        visual = self.model.visual
        cfg = visual.config
        merge = cfg.spatial_merge_size
        dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        param = next(visual.parameters())
        pixels = torch.zeros(merge * merge, dim, device=param.device, dtype=param.dtype)
        out = visual(pixels, grid_thw=torch.tensor([[1, merge, merge]], device=param.device), return_dict=True)
        # only what the step consumes (merged embeddings, DeepStack features): the same backward graph
        used = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
        return sum(t.float().sum() for t in _tensors(used)) * 0.0

    # -- 2. merge --------------------------------------------------------------------------------------------
    def merge(self, ids: torch.Tensor, embeds: torch.Tensor, features: dict) -> tuple[torch.Tensor, dict]:
        """Placeholder embeddings replaced by the visual features; the decoder's DeepStack inputs (or none)."""
        masks = {}
        for modality, _, _, token_key in MODALITIES:
            if modality not in features:
                continue
            feats = features[modality][0].to(embeds.device, embeds.dtype)
            mask = ids == getattr(self.model.config, token_key)
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"{modality} features and placeholder tokens do not match: {int(mask.sum())} "
                                 f"tokens, {feats.shape[0]} features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
            masks[modality] = mask
        have = [m for m in masks if features[m][1] is not None]
        if not have:
            return embeds, {}
        if len(have) == 1:  # one modality: its features are already in sequence order
            return embeds, {"visual_pos_masks": masks[have[0]], "deepstack_visual_embeds": features[have[0]][1]}
        visual = masks["image"] | masks["video"]
        layers = []
        for k in range(len(features[have[0]][1])):  # image and video features joined in sequence order
            joint = features[have[0]][1][k].new_zeros(int(visual.sum()), embeds.shape[-1])
            for m in have:
                joint[masks[m][visual]] = features[m][1][k]
            layers.append(joint)
        return embeds, {"visual_pos_masks": visual, "deepstack_visual_embeds": layers}

    # -- 3. decoder inputs -----------------------------------------------------------------------------------
    def decoder_inputs(self, batch: dict, ids: torch.Tensor, embeds: torch.Tensor, packed: bool) -> dict:
        """Position ids and attention inputs: the packer's (packed rows), or HF's own M-RoPE ids for padded rows."""
        if packed:
            inputs = varlen_inputs(batch, self.config._attn_implementation)
            return {k: inputs[k] for k in ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k",
                                           "max_length_q", "max_length_k") if k in inputs}
        out = {"attention_mask": batch.get("attention_mask")}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"]
            return out
        extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if batch.get("second_per_grid_ts") is not None \
            else {}
        grids = {g: batch.get(g) for _, _, g, _ in MODALITIES}
        if batch.get("visual_owner") is not None:  # rows sharing a prompt: its grids once per row
            for col, (_, _, g, _) in enumerate(MODALITIES):
                if grids[g] is not None:
                    order = tile_order(batch["visual_counts"][:, col], batch["visual_owner"])
                    grids[g] = grids[g][order]
                    if g == "video_grid_thw" and extra:
                        extra["second_per_grid_ts"] = extra["second_per_grid_ts"][order]
        out["position_ids"] = self.model.compute_3d_position_ids(
            input_ids=ids, inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), past_key_values=None,
            mm_token_type_ids=batch.get("mm_token_type_ids"), **grids, **extra)
        return out


# -- 4. log-probs from hidden states, chunked ------------------------------------------------------------------
def _chunk_logps(lm_head, h: torch.Tensor, target: torch.Tensor, entropy: bool, nll: bool):
    """One chunk: fp32 logits -> log p of the targets (nll: F.cross_entropy's -log p, the lm objective's
    arithmetic; the preference and RL objectives' log-probs are logsumexp's; they differ in the last bit)."""
    logits = lm_head(h).float()
    if nll:
        out = F.cross_entropy(logits, target, reduction="none")
    else:
        out = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    if not entropy:
        return out, None
    with torch.no_grad():
        return out, torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def _chunks(n_tokens: int, chunk: int, device, sync_group) -> int:
    """Chunks to run: at least one (lm_head stays in the graph without supervised tokens: zero gradients, the same
    reductions on every rank); with `sync_group` (lm_head calls are collectives, ZeRO-3) the group's largest."""
    n = max(1, -(-n_tokens // chunk))
    if sync_group is not None:
        count = torch.tensor([n], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=sync_group)
        n = int(count)
    return n


def _supervised(hidden: torch.Tensor, labels: torch.Tensor):
    target = labels[:, 1:]
    sup = target != IGNORE
    return sup, hidden[:, :-1][sup], target[sup]


def _scatter(sup: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return torch.zeros(sup.shape, dtype=flat.dtype, device=flat.device).masked_scatter(sup, flat)


def token_logps(lm_head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int, entropy: bool = False,
                sync_group=None, nll: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels[:, t+1]) from hidden[:, t] ([B, L-1], 0 where unsupervised; with `nll` -log p) and the
    detached entropy, for any loss of the log-probs (DPO, RL).

    Only supervised positions reach lm_head, `chunk` at a time. With gradients on and more than one chunk, each
    chunk's logits are recomputed in backward (checkpoint), so the peak is one chunk's fp32 logits."""
    sup, h, t = _supervised(hidden, labels)
    return _logps(lm_head, sup, h, t, _chunks(len(t), chunk, hidden.device, sync_group), chunk, entropy, nll)


def _logps(lm_head, sup, h, t, n: int, chunk: int, entropy: bool, nll: bool):
    recompute = torch.is_grad_enabled() and n > 1
    logps, ents = [], []
    for i in range(n):
        hs, ts = h[i * chunk:(i + 1) * chunk], t[i * chunk:(i + 1) * chunk]
        if recompute:
            lp, e = checkpoint(_chunk_logps, lm_head, hs, ts, entropy, nll, use_reentrant=False)
        else:
            lp, e = _chunk_logps(lm_head, hs, ts, entropy, nll)
        logps.append(lp)
        ents.append(e)
    flat = torch.cat(logps)
    out = _scatter(sup, flat)
    if not len(t):  # keep the (empty) chunk in the graph
        out = out + flat.sum()
    return out, _scatter(sup, torch.cat(ents)) if entropy else None


def weighted_nll(lm_head, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, chunk: int,
                 sync_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ weights·CE over the supervised targets, the detached CE [B, L-1]): the lm objective's loss.

    One chunk: plain autograd. More: `_FusedLinear`, which computes the gradients chunk by chunk in the forward
    (three matmuls per chunk, as with full logits; nothing recomputed). Under ZeRO-3 (`sync_group`) lm_head's
    weight exists only inside its own module call, so the chunks go through `token_logps` (recomputed)."""
    sup, h, t = _supervised(hidden, labels)
    return _weighted_nll(lm_head, sup, h, t, weights, _chunks(len(t), chunk, hidden.device, sync_group), chunk,
                         sync_group)


def _weighted_nll(lm_head, sup, h, t, weights, n: int, chunk: int, sync_group):
    fused = getattr(lm_head, "fused_nll", None)  # a head with its own fused path (engine=megatron's vocab-parallel)
    if fused is not None and torch.is_grad_enabled():
        loss, flat = fused(h, t, weights[sup].float(), chunk)
        return loss, _scatter(sup, flat)
    if n == 1 or sync_group is not None or not torch.is_grad_enabled():
        ce, _ = _logps(lm_head, sup, h, t, n, chunk, entropy=False, nll=True)
        return (ce * weights).sum(), ce.detach()
    loss, flat, _ = _FusedLinear.apply(h, lm_head.weight, weights[sup].float(), chunk, partial(_nll_grad, t))
    return loss, _scatter(sup, flat)


def _nll_grad(target, logits, s: int, e: int):
    """CE of one chunk's fp32 logits and its gradient softmax - onehot, in place of the logits."""
    ts = target[s:e]
    lsm = torch.log_softmax(logits, -1)
    ce = -lsm.gather(-1, ts[:, None])[:, 0]
    g = lsm.exp_()
    g[torch.arange(len(ts), device=g.device), ts] -= 1.0
    return ce, g, None


def chunked_loss(lm_head, h: torch.Tensor, t: torch.Tensor, w: torch.Tensor, n: int, chunk: int, loss_fn,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ w·ℓ, ℓ [N] detached, stats [N, k] detached) of a per-token loss of the logits:
    `loss_fn(logits fp32 [c, V], targets [c], start, end) -> (ℓ [c], stats [c, k])` on chunk [start, end) of the
    supervised positions (so it can fetch its own per-chunk inputs, e.g. a teacher's logits). `fused` (lm_head's
    weight is a plain tensor, not ZeRO-3's): each chunk's gradient is taken in the forward (`_FusedLinear`, autograd
    on that chunk's logits only); else, with gradients on, each chunk is recomputed in backward."""
    if fused and torch.is_grad_enabled() and n > 0:
        return _FusedLinear.apply(h, lm_head.weight, w, chunk, partial(_autograd_grad, loss_fn, t))
    recompute = torch.is_grad_enabled() and n > 1
    run = lambda hs, ts, s, e: loss_fn(lm_head(hs).float(), ts, s, e)  # noqa: E731
    losses, stats = [], []
    for i in range(n):
        s, e = i * chunk, (i + 1) * chunk
        args = (h[s:e], t[s:e], s, min(e, len(t)))
        lt, st = checkpoint(run, *args, use_reentrant=False) if recompute else run(*args)
        losses.append(lt)
        stats.append(st.detach())
    per_token = torch.cat(losses)
    total = (per_token * w).sum()
    if not len(t):  # keep the (empty) chunk in the graph
        total = total + per_token.sum()
    return total, per_token.detach(), torch.cat(stats)


def _autograd_grad(loss_fn, target, logits, s: int, e: int):
    """ℓ of one chunk, its gradient with respect to the chunk's logits (autograd on [c, V] only), the stats."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        loss, stats = loss_fn(z, target[s:e], s, min(e, len(target)))
        (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), g, stats.detach()


class _FusedLinear(torch.autograd.Function):
    """Σ_i w_i·ℓ_i(h_i @ weightᵀ) with d/dh and d/dweight computed per chunk in the forward. The loss is linear in
    the per-token losses and the weights are known there, so only the upstream scalar is missing; backward scales
    the stored gradients by it. `grad_fn(logits fp32 [c, V], start, end) -> (ℓ [c], dℓ/dlogits [c, V], stats [c, k]
    or None)`: CE's closed form (`_nll_grad`) or autograd on the chunk (`_autograd_grad`). Per chunk: logits, their
    gradient, two gradient matmuls; no [N, V] tensor is kept (liger-kernel's fused linear cross-entropy, in plain
    torch). The gradient of the weight is accumulated in fp32 (a weight-sized buffer from forward to backward)."""

    @staticmethod
    def forward(ctx, h, weight, w, chunk, grad_fn):
        n = len(w)
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        stats = None
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        for s in range(0, n, chunk):
            hs, ws = h[s:s + chunk], w[s:s + chunk]
            loss, g, st = grad_fn(F.linear(hs, weight).float(), s, s + chunk)
            losses[s:s + chunk] = loss
            if st is not None:
                if stats is None:
                    stats = torch.empty(n, st.shape[1], dtype=st.dtype, device=st.device)
                stats[s:s + chunk] = st
            g = (g * ws[:, None]).to(weight.dtype)  # d ℓ / d logits times the token's weight
            grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ hs).float()
        if stats is None:
            stats = losses.new_empty(n, 0)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
        ctx.mark_non_differentiable(losses, stats)
        return (losses * w).sum(), losses, stats

    @staticmethod
    def backward(ctx, g_loss, g_losses, g_stats):
        grad_h, grad_w = ctx.saved_tensors
        dw = (grad_w * g_loss).to(ctx.w_dtype) if ctx.has_w else None
        return grad_h * g_loss.to(grad_h.dtype), dw, None, None, None


# -- helpers ---------------------------------------------------------------------------------------------------
def tile_order(counts: torch.Tensor, owner: torch.Tensor) -> list[int]:
    """Grid indices in row order when row i shows the `counts[owner[i]]` grids of its owner (owners' grids are
    stored one after another)."""
    start = [0] + torch.cumsum(counts, 0).tolist()
    return [g for u in owner.tolist() for g in range(start[u], start[u] + int(counts[u]))]


def tile_features(out, order: list[int]):
    """An encoder output of get_image/video_features (per-grid pieces) with its pieces in `order` (also HF
    generate's `mm_encoder_outputs` for rollouts, stages/rollout.py)."""
    out.pooler_output = [out.pooler_output[g] for g in order]
    ds = getattr(out, "deepstack_features", None)
    if ds:
        out.deepstack_features = [[layer[g] for g in order] for layer in ds]
    return out


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "values"):
        for v in x.values():
            yield from _tensors(v)


def step_module(model) -> torch.nn.Module:
    """What a forward calls: an engine or a VLM as it is; a bare HF model wrapped (sharing its modules)."""
    return VLM(model) if isinstance(model, PreTrainedModel) else model


def hf_model(model) -> PreTrainedModel:
    """The HF model of an engine (its step module), a VLM, or itself: what generation and export use."""
    if isinstance(model, PreTrainedModel):
        return model
    return model.hf if isinstance(model, VLM) else hf_model(model.model)
