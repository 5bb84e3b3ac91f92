"""Model FLOPs of a training step, for the LLM and the ViT (attention terms included), and MFU.

Counted from the model itself, not a hand formula per family: every Linear/Conv weight in a tower costs
2 FLOPs per element per token (patch for the ViT, merged token for the mergers), attention costs
2·n²·d for causal text (QKᵀ and AV, half the square) and 4·p²·d for the bidirectional ViT per image
(per window in Qwen2.5-VL's windowed blocks). Only useful work counts: padding and the masked-out
off-diagonal blocks of a packed row do not. Backward multipliers follow what actually runs: a trainable
tower costs 3× its forward, a frozen tower that gradients must cross (an LLM below a trainable merger)
2×, a frozen tower with nothing trainable upstream 1×.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# dense peak FLOP/s per device (bf16 tensor core, fp32/tf32 tensor core); names as torch reports them
PEAK_FLOPS = {
    "H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
    "A10G": (125e12, 62.5e12), "L4": (121e12, 60e12), "B200": (2250e12, 1100e12), "GH200": (989e12, 494e12),
}


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of this process's accelerator, or None on CPU / an unknown device (then no MFU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return bf16 if dtype == "bf16" else fp32
    return None


def _linear_elems(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Conv2d)))


@dataclass
class FlopModel:
    llm_linear: int  # weight elements of the decoder's and lm_head's matmuls
    llm_layers: int
    llm_attn_dim: int  # heads × head_dim
    vit_linear: int  # patch embed + blocks
    vit_layers: int
    vit_dim: int
    vit_window_patches: int  # patches per attention window in windowed blocks (0: all blocks full)
    vit_full_layers: int
    merger_linear: int  # per merged token: the merger and every DeepStack merger
    merge: int
    mult: dict  # forward+backward multiplier per tower: vision, merger, llm

    def micro_batch(self, batch: dict) -> float:
        """FLOPs of one forward+backward of a micro-batch (the contract in data/README.md)."""
        sid = batch["sample_ids"]
        lengths = torch.bincount(sid[sid >= 0].flatten()).float() if (sid >= 0).any() else torch.zeros(0)
        n_tok = float(lengths.sum())
        llm = 2 * self.llm_linear * n_tok + 2 * self.llm_layers * self.llm_attn_dim * float((lengths ** 2).sum())
        vit = merger = 0.0
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in batch and batch[key] is not None and len(batch[key]):
                thw = batch[key].double()
                patches = thw.prod(-1)
                frame = thw[:, 1] * thw[:, 2]  # attention is per image, per frame group of a video
                vit += 2 * self.vit_linear * float(patches.sum())
                full = 4 * self.vit_dim * float((patches * frame).sum())
                if self.vit_window_patches:
                    windowed = 4 * self.vit_dim * float(patches.sum()) * self.vit_window_patches
                    vit += self.vit_full_layers * full + (self.vit_layers - self.vit_full_layers) * windowed
                else:
                    vit += self.vit_layers * full
                merger += 2 * self.merger_linear * float(patches.sum()) / self.merge ** 2
        return self.mult["llm"] * llm + self.mult["vision"] * vit + self.mult["merger"] * merger


def build(model: torch.nn.Module, trainable: list[str]) -> FlopModel:
    inner = model.model
    text = inner.language_model.config
    vis = inner.visual.config
    vision_blocks = inner.visual.blocks
    mergers = [inner.visual.merger, *getattr(inner.visual, "deepstack_merger_list", [])]
    vit_linear = _linear_elems(vision_blocks) + _linear_elems(inner.visual.patch_embed)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vit_dim = getattr(vis, "embed_dim", None) or vis.hidden_size
    window = getattr(vis, "window_size", 0)
    full_idx = getattr(vis, "fullatt_block_indexes", None)
    on = set(trainable)
    mult = {"vision": 3 if "vision" in on else 1}
    mult["merger"] = 3 if "merger" in on else (2 if "vision" in on else 1)
    mult["llm"] = 3 if "llm" in on else (2 if on & {"vision", "merger"} else 1)
    return FlopModel(
        llm_linear=_linear_elems(inner.language_model.layers) + model.lm_head.weight.numel(),
        llm_layers=text.num_hidden_layers, llm_attn_dim=text.num_attention_heads * head_dim,
        vit_linear=vit_linear, vit_layers=vis.depth, vit_dim=vit_dim,
        vit_window_patches=(window // vis.patch_size) ** 2 if window and full_idx is not None else 0,
        vit_full_layers=len(full_idx) if full_idx is not None else vis.depth,
        merger_linear=sum(_linear_elems(m) for m in mergers), merge=vis.spatial_merge_size, mult=mult)
