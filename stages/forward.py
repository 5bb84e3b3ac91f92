"""The one forward every objective uses: packed inputs in, logits out, every rank running the same modules.

Under ZeRO-3 each module's forward all-gathers its parameters and its backward reduce-scatters their
gradients; a rank whose micro-batch has no image would skip the ViT's collectives while the others wait
in them (the known mixed-batch hang). So a micro-batch without media runs the ViT on one dummy 2×2-patch
image and adds 0 × its output to the loss: the same collectives on every rank, zero gradient, no effect
on the result. The dummy runs from a hook after the text embedding, i.e. inside DeepSpeed's forward and
exactly where the model's own ViT call would be (all three families embed the text first, then run the
ViT), so every rank fetches the same parameters in the same order.

Rollout micro-batches (stages/rollout.py) hold several completions of one prompt: their images are stored once
per distinct prompt (`visual_owner`: row -> prompt, `visual_counts`: grids per prompt and modality). The ViT then
runs once per distinct image, from the same after-embedding hook, and the features (and Qwen3-VL's DeepStack
features) are tiled per row and handed to the model as its `mm_encoder_outputs`; the gradient of a shared image
is the sum over its rows, as if each row had run the ViT itself.
"""
from __future__ import annotations

import torch

from data.pack import varlen_inputs

INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
          "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "values"):
        for v in x.values():
            yield from _tensors(v)


def _hf_model(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model


def dummy_vision(model) -> torch.Tensor:
    """0 × the ViT (and every merger) on a minimal image: keeps the vision collectives in step across ranks."""
    hf = _hf_model(model)
    visual = hf.model.visual
    cfg = visual.config
    merge = cfg.spatial_merge_size
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    device = next(hf.parameters()).device
    dtype = next(visual.parameters()).dtype
    pixels = torch.zeros(merge * merge, dim, device=device, dtype=dtype)
    grid = torch.tensor([[1, merge, merge]], device=device)
    out = visual(pixels, grid_thw=grid, return_dict=True)
    # only what the model itself consumes (merged embeddings, DeepStack features): the same backward graph
    used = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
    return sum(t.float().sum() for t in _tensors(used)) * 0.0


def _pre_forward(module, args, kwargs):
    """Notes whether this (training) forward carries media; generation calls (use_cache) are left alone."""
    module._zero_from_vision = None
    module._want_dummy = (kwargs.get("use_cache") is False and kwargs.get("pixel_values") is None
                          and kwargs.get("pixel_values_videos") is None and module._shared_visual is None)


def _after_embeddings(embed, args, output):
    """The models embed the text first and run the ViT next: the dummy (or the shared images) go exactly there."""
    hf = embed._owner[0]
    if hf._shared_visual is not None:
        pending, hf._shared_visual = hf._shared_visual, None
        hf._want_dummy = False
        pending["into"].update(encode_shared(hf, pending["batch"]))
    elif hf._want_dummy:
        hf._want_dummy = False
        hf._zero_from_vision = dummy_vision(hf)


MODALITIES = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def tile_order(counts: torch.Tensor, owner: torch.Tensor) -> list[int]:
    """Grid indices in row order when row i shows the `counts[owner[i]]` grids of its owner (owners' grids are
    stored one after another)."""
    start = [0] + torch.cumsum(counts, 0).tolist()
    return [g for u in owner.tolist() for g in range(start[u], start[u] + int(counts[u]))]


def tile_features(out, order: list[int]):
    """An encoder output of get_image/video_features (per-grid pieces) with its pieces in `order`."""
    out.pooler_output = [out.pooler_output[g] for g in order]
    ds = getattr(out, "deepstack_features", None)
    if ds:
        out.deepstack_features = [[layer[g] for g in order] for layer in ds]
    return out


def encode(hf, modality: str, pixels: torch.Tensor, grids: torch.Tensor):
    """The model's own get_image_features / get_video_features (ViT + merger, DeepStack), split per grid."""
    fn = hf.model.get_image_features if modality == "image" else hf.model.get_video_features
    return fn(pixels, grids, return_dict=True)


def encode_shared(hf, batch: dict) -> dict:
    """mm_encoder_outputs of a deduplicated batch: each distinct image once through the ViT, tiled per row."""
    out = {}
    for modality, pix_key, grid_key in MODALITIES:
        if batch.get(pix_key) is None:
            continue
        col = 0 if modality == "image" else 1
        order = tile_order(batch["visual_counts"][:, col], batch["visual_owner"])
        out[modality] = tile_features(encode(hf, modality, batch[pix_key], batch[grid_key]), order)
    return out


def shared_inputs(hf, batch: dict, inputs: dict) -> dict:
    """Model inputs of a batch whose rows share images: grids (and video seconds) tiled per row for the M-RoPE
    ids, the pixels replaced by an `mm_encoder_outputs` mapping that the after-embedding hook fills."""
    into: dict = {}
    for modality, pix_key, grid_key in MODALITIES:
        if inputs.pop(pix_key, None) is None:
            continue
        col = 0 if modality == "image" else 1
        order = tile_order(batch["visual_counts"][:, col], batch["visual_owner"])
        inputs[grid_key] = batch[grid_key][order]
        if modality == "video" and batch.get("second_per_grid_ts") is not None:
            inputs["second_per_grid_ts"] = batch["second_per_grid_ts"][order]
    hf._shared_visual = {"batch": batch, "into": into}
    inputs["mm_encoder_outputs"] = into
    return inputs


def _install(model) -> torch.nn.Module:
    hf = _hf_model(model)
    if not getattr(hf, "_dummy_vision_hook", False):
        hf.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        embed = hf.get_input_embeddings()
        embed._owner = [hf]  # a list, so the module is not registered as a child
        embed.register_forward_hook(_after_embeddings)
        hf._dummy_vision_hook = True
        hf._shared_visual = None
    return hf


def logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, L, V], a zero scalar to add to the loss) for a micro-batch in the data/README.md contract."""
    hf = _install(model)
    B, L = batch["input_ids"].shape
    varlen = batch.get("attention_mask") is None and batch.get("cu_seqlens") is not None
    if varlen:  # packed rows flattened to one sequence, boundaries by cu_seqlens (training/attention.py)
        inputs = varlen_inputs(batch, hf.config._attn_implementation)
        inputs.pop("use_cache")
    else:
        inputs = {k: batch[k] for k in INPUTS if batch.get(k) is not None}
    shared = batch.get("visual_owner") is not None and (batch.get("pixel_values") is not None
                                                         or batch.get("pixel_values_videos") is not None)
    if shared:
        inputs = shared_inputs(hf, batch, inputs)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        hf._shared_visual = None
    zero = hf._zero_from_vision
    logits = out.logits.view(B, L, -1) if varlen else out.logits
    return logits, (zero if zero is not None else out.logits.new_zeros(()))
