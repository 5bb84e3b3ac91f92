"""Forward passes and rollouts shared by the preference and RL objectives.

`token_logps` is the one place log-probabilities of targets are taken (policy, reference, rollout policy), so
DPO, SAPO and their reference models agree to the bit. The rollout helpers turn a micro-batch of RL
prompt samples into per-prompt pieces, sample completions with the policy's KV cache, and assemble
prompt+completion sequences back into micro-batches (one sequence per row, right-padded, 2D mask: the model
computes its own M-RoPE ids, so no packer is needed for the few thousand tokens of a rollout row). A prompt's
images go through the ViT once per prompt in generation and once per micro-batch in the log-prob passes, never
once per completion.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from data.encode import IGNORE
from training import vlm

VISUAL = (("pixel_values", "image_grid_thw", 1), ("pixel_values_videos", "video_grid_thw", 2))


def token_logps(model, batch: dict, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels[:, t+1] | ...) at every position t ([B, L-1], 0 where unsupervised) and, if asked, the
    detached entropy of the next-token distribution there: the model step of training/vlm.py (same modules on
    every rank, no [L, V] logits), through the engine when `model` is one."""
    return vlm.step_module(model)(batch, entropy=entropy)


def on(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def per_sample(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of `values` ([B, L-1], aligned with the shifted targets) and supervised counts per sample id."""
    sid = batch["sample_ids"][:, 1:]
    sup = (batch["labels"][:, 1:] != IGNORE) & (sid >= 0)
    n = int(batch["sample_ids"].max()) + 1
    idx = sid[sup]
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, idx, values[sup])
    counts = torch.bincount(idx, minlength=n).to(values.dtype)
    return sums, counts


def split_samples(batch: dict, merge: int = 2) -> list[dict]:
    """The micro-batch's samples, each alone: tokens (and labels), its own images/videos, and its meta (sample-id
    order).

    Visual tensors are concatenated in the order samples appear (row-major); each sample takes as many
    grids as its pad tokens need (t*h*w/merge^2 tokens per grid)."""
    sids, ids, mm = batch["sample_ids"], batch["input_ids"], batch["mm_token_type_ids"]
    order = []  # sample ids in row-major order of first appearance
    for row in sids.tolist():
        for s in row:
            if s >= 0 and (not order or order[-1] != s):
                order.append(s)
    out = {}
    cursor = {k: [0, 0] for k, _, _ in VISUAL}  # (grid index, pixel row) per modality
    for s in order:
        where = sids == s
        piece = {"input_ids": ids[where], "mm_token_type_ids": mm[where]}
        if "labels" in batch:
            piece["labels"] = batch["labels"][where]
        for pix_key, grid_key, kind in VISUAL:
            need = int((piece["mm_token_type_ids"] == kind).sum())
            if not need:
                continue
            g0, p0 = cursor[pix_key]
            g, got = g0, 0
            while got < need:
                got += int(batch[grid_key][g].prod()) // merge**2
                g += 1
            if got != need:
                raise ValueError(f"sample {s}: {need} visual pad tokens but its grids give {got}")
            grids = batch[grid_key][g0:g]
            rows = int(grids.prod(-1).sum())
            piece[grid_key], piece[pix_key] = grids, batch[pix_key][p0:p0 + rows]
            if grid_key == "video_grid_thw" and "second_per_grid_ts" in batch:
                piece["second_per_grid_ts"] = batch["second_per_grid_ts"][g0:g]
            cursor[pix_key] = [g, p0 + rows]
        meta = batch.get("meta")
        piece["meta"] = dict(meta[s]) if meta is not None else {}
        piece["source"] = batch["sources"][s] if s < len(batch.get("sources", [])) else "default"
        out[s] = piece
    return [out[s] for s in sorted(out)]


def _cat_visual(pieces: list[dict], batch: dict) -> None:
    for pix_key, grid_key, _ in VISUAL:
        have = [p for p in pieces if grid_key in p]
        if have:
            batch[pix_key] = torch.cat([p[pix_key] for p in have])
            batch[grid_key] = torch.cat([p[grid_key] for p in have])
            if grid_key == "video_grid_thw" and all("second_per_grid_ts" in p for p in have):
                batch["second_per_grid_ts"] = torch.cat([p["second_per_grid_ts"] for p in have])


def _any_rank(flags: list[bool], device, synced: bool) -> list[bool]:
    """Per flag: does any rank have it (a MAX all-reduce when ranks must run the same modules)."""
    if not synced or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def encode_prompts(hf, prompts: list[dict], owner: torch.Tensor, synced: bool, device) -> tuple[dict, dict]:
    """(mm_encoder_outputs, tiled grid inputs) for rows whose prompt is `prompts[owner[row]]`.

    Each prompt's images and videos go through the ViT once; the features are tiled per row. With `synced`
    (ZeRO-3, several ranks) a rank without an image (video) while another rank has one runs the ViT on a dummy
    image at the same point, so every rank joins the same parameter all-gathers."""
    step = vlm.VLM(hf)
    have = [[p for p in prompts if grid_key in p] for _, _, grid_key, _ in vlm.MODALITIES]
    need = _any_rank([bool(h) for h in have], device, synced)
    enc, grids = {}, {}
    for (modality, pix_key, grid_key, _), mine, wanted in zip(vlm.MODALITIES, have, need):
        if not mine:
            if wanted:
                step.dummy_vision()
            continue
        counts = torch.tensor([len(p[grid_key]) if grid_key in p else 0 for p in prompts])
        order = vlm.tile_order(counts, owner)
        g = torch.cat([p[grid_key] for p in mine])
        out = step.encode(modality, torch.cat([p[pix_key] for p in mine]).to(device), g.to(device))
        enc[modality] = vlm.tile_features(out, order)
        grids[grid_key] = g[order].to(device)
        if modality == "video" and all("second_per_grid_ts" in p for p in mine):
            grids["second_per_grid_ts"] = torch.cat([p["second_per_grid_ts"] for p in mine])[order].to(device)
    return enc, grids


@torch.no_grad()
def generate(module, prompts: list[dict], n: int, pad_id: int, stop_ids: list[int], temperature: float,
             top_p: float, max_new_tokens: int, synced: bool, banned: list[int] = ()) -> list[list[int]]:
    """n sampled completions per prompt (prompt-major; temperature 0: greedy), each cut after its first stop token.

    One left-padded batch of the n copies of every prompt, HF generate with its KV cache. The vision encoder runs
    once per prompt, not once per completion: the features are computed here and tiled over the n rows (HF's own
    num_return_sequences path does the same in transformers 5.23; doing it here keeps that guarantee, allows
    greedy n > 1, and lets ZeRO-3 ranks without images join the ViT's collectives). `synced` keeps every rank
    stepping until all are done, which ZeRO-3 needs (each forward all-gathers the partitioned weights). `banned`
    tokens (the vision placeholders) are never sampled: one in a completion would ask the model for an image it
    does not have."""
    with getattr(module, "generation", nullcontext)():  # engine=megatron: its HF decoder gets the weights
        out = _generate(vlm.hf_model(module), prompts, n, pad_id, stop_ids, temperature, top_p, max_new_tokens,
                        synced, banned)
    return getattr(module, "broadcast_replica", lambda x: x)(out)  # TP ranks of a replica: the same completions


def _generate(module, prompts: list[dict], n: int, pad_id: int, stop_ids: list[int], temperature: float,
              top_p: float, max_new_tokens: int, synced: bool, banned) -> list[list[int]]:
    device = next(module.parameters()).device
    P = max(len(p["input_ids"]) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    mm = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        k = len(p["input_ids"])
        ids[i, P - k:], mask[i, P - k:], mm[i, P - k:] = p["input_ids"], 1, p["mm_token_type_ids"]
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
    batch = {k: v.repeat_interleave(n, 0).to(device) for k, v in batch.items()}
    owner = torch.arange(len(prompts)).repeat_interleave(n)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = module.training
    module.eval()
    try:
        enc, grids = encode_prompts(module, prompts, owner, synced, device)
        if enc:
            batch.update(grids, mm_encoder_outputs=enc)
        seqs = module.generate(**batch, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=1,
                               eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced, use_cache=True,
                               suppress_tokens=list(banned) or None)
    finally:
        module.train(was_training)
    out = []
    for row in seqs[:, P:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(row[:cut])
    return out


def collate_sequences(prompts: list[dict], completions: list[list[int]], pad_id: int) -> dict:
    """prompt+completion rows (right-padded) with labels on the completion only; meta per row.

    Rows of one prompt (the same dict) share its images: the pixels are stored once per distinct prompt,
    `visual_owner` maps each row to its prompt and `visual_counts` gives each prompt's (image, video) grid
    counts, so the model step (training/vlm.py) runs the ViT once per image and tiles the features over the rows."""
    rows = [torch.cat([p["input_ids"], torch.tensor(c, dtype=torch.long)]) for p, c in zip(prompts, completions)]
    B, L = len(rows), max(len(r) for r in rows)
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((B, L), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((B, L), dtype=torch.long),
        "sample_ids": torch.full((B, L), -1, dtype=torch.long),
    }
    for i, (p, r) in enumerate(zip(prompts, rows)):
        k, n = len(p["input_ids"]), len(r)
        batch["input_ids"][i, :n], batch["attention_mask"][i, :n], batch["sample_ids"][i, :n] = r, 1, i
        batch["labels"][i, k:n] = r[k:]
        batch["mm_token_type_ids"][i, :k] = p["mm_token_type_ids"]
    distinct, owner = [], []
    index = {}
    for p in prompts:
        if id(p) not in index:
            index[id(p)] = len(distinct)
            distinct.append(p)
        owner.append(index[id(p)])
    _cat_visual(distinct, batch)
    if any(grid_key in batch for _, _, grid_key, _ in vlm.MODALITIES):
        batch["visual_owner"] = torch.tensor(owner, dtype=torch.long)
        batch["visual_counts"] = torch.tensor(
            [[len(p[g]) if g in p else 0 for _, _, g, _ in vlm.MODALITIES] for p in distinct], dtype=torch.long)
    batch["sources"] = [p["source"] for p in prompts]
    batch["meta"] = [dict(p["meta"]) for p in prompts]
    return batch
