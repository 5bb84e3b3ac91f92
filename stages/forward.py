"""The one forward every objective uses: packed inputs in, logits out, every rank running the same modules.

Under ZeRO-3 each module's forward all-gathers its parameters and its backward reduce-scatters their
gradients; a rank whose micro-batch has no image would skip the ViT's collectives while the others wait
in them (the known mixed-batch hang). So a micro-batch without media runs the ViT on one dummy 2×2-patch
image and adds 0 × its output to the loss: the same collectives on every rank, zero gradient, no effect
on the result.
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
    out = visual(pixels, grid_thw=grid)
    return sum(t.float().sum() for t in _tensors(out)) * 0.0


def logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, L, V], a zero scalar to add to the loss) for a micro-batch in the data/README.md contract."""
    inputs = {k: batch[k] for k in INPUTS if batch.get(k) is not None}
    has_media = "pixel_values" in inputs or "pixel_values_videos" in inputs
    # run the ViT first in both cases, so the order of collectives is the same as in the model's own forward
    zero = dummy_vision(model) if not has_media else torch.zeros((), device=batch["input_ids"].device)
    out = model(**inputs, use_cache=False)
    return out.logits, zero
