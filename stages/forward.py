"""The one forward every objective uses: packed inputs in, logits out, every rank running the same modules.

Under ZeRO-3 each module's forward all-gathers its parameters and its backward reduce-scatters their
gradients; a rank whose micro-batch has no image would skip the ViT's collectives while the others wait
in them (the known mixed-batch hang). So a micro-batch without media runs the ViT on one dummy 2×2-patch
image and adds 0 × its output to the loss: the same collectives on every rank, zero gradient, no effect
on the result. The dummy runs from a hook after the text embedding, i.e. inside DeepSpeed's forward and
exactly where the model's own ViT call would be (all three families embed the text first, then run the
ViT), so every rank fetches the same parameters in the same order.
"""
from __future__ import annotations

import torch

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
                          and kwargs.get("pixel_values_videos") is None)


def _after_embeddings(embed, args, output):
    """The models embed the text first and run the ViT next: the dummy goes exactly there."""
    hf = embed._owner[0]
    if hf._want_dummy:
        hf._want_dummy = False
        hf._zero_from_vision = dummy_vision(hf)


def _install(model) -> torch.nn.Module:
    hf = _hf_model(model)
    if not getattr(hf, "_dummy_vision_hook", False):
        hf.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        embed = hf.get_input_embeddings()
        embed._owner = [hf]  # a list, so the module is not registered as a child
        embed.register_forward_hook(_after_embeddings)
        hf._dummy_vision_hook = True
    return hf


def logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, L, V], a zero scalar to add to the loss) for a micro-batch in the data/README.md contract."""
    hf = _install(model)
    inputs = {k: batch[k] for k in INPUTS if batch.get(k) is not None}
    out = model(**inputs, use_cache=False)
    zero = hf._zero_from_vision
    return out.logits, (zero if zero is not None else out.logits.new_zeros(()))
