"""Model FLOPs of a training step, for the LLM and the ViT (attention terms included), and MFU.

Counted from the model itself, not a hand formula per family: every Linear/Conv weight in a tower costs
2 FLOPs per element per token (patch for the ViT, merged token for the mergers), attention costs
2·n²·d for causal text (QKᵀ and AV, half the square) and 4·p²·d for the bidirectional ViT per image
(per window in Qwen2.5-VL's windowed blocks). Only useful work counts: padding and the masked-out
off-diagonal blocks of a packed row do not. Backward multipliers follow what actually runs: a trainable
tower costs 3× its forward, a frozen tower that gradients must cross (an LLM below a trainable merger)
2×, a frozen tower with nothing trainable upstream 1×.

A MoE decoder (training/models.py's router and experts groups) counts what a token runs: every router (each token
scores all E experts) and num_experts_per_tok of the E experts' weights, not all of them. Its dense part, routers
and experts carry their own multipliers (3× the trainable ones, 2× the frozen ones that gradients cross).
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
    llm_linear: int  # weight elements of the decoder's and lm_head's dense matmuls (all of them in a dense model)
    llm_layers: int
    llm_attn_dim: int  # heads × head_dim
    vit_linear: int  # patch embed + blocks
    vit_layers: int
    vit_dim: int
    vit_window_patches: int  # patches per attention window in windowed blocks (0: all blocks full)
    vit_full_layers: int
    merger_linear: int  # per merged token: the merger and every DeepStack merger
    merge: int
    mult: dict  # forward+backward multiplier per part: vision, merger, llm (its dense part), router, experts
    router_linear: int = 0  # MoE: every router's weight elements (each token scores every expert)
    expert_linear: int = 0  # MoE: the expert weight elements one token runs (top-k of E experts, every MoE layer)

    def micro_batch(self, batch: dict) -> float:
        """FLOPs of one forward+backward of a micro-batch (the contract in data/README.md)."""
        sid = batch["sample_ids"]
        lengths = torch.bincount(sid[sid >= 0].flatten()).float() if (sid >= 0).any() else torch.zeros(0)
        n_tok = float(lengths.sum())
        llm = self.mult["llm"] * (2 * self.llm_linear * n_tok +
                                  2 * self.llm_layers * self.llm_attn_dim * float((lengths ** 2).sum()))
        llm += 2 * n_tok * (self.mult.get("router", 0) * self.router_linear +
                            self.mult.get("experts", 0) * self.expert_linear)
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
        return llm + self.mult["vision"] * vit + self.mult["merger"] * merger


def _moe_elems(model: torch.nn.Module, text) -> tuple[int, int]:
    """(router, active expert) weight elements per token: parameters of training/models.py's router and experts
    groups; an expert tensor [E, ...] counts num_experts_per_tok / E of its elements. (0, 0) for a dense model."""
    from training import models

    family = _family(model)
    if family is None or not family.moe:
        return 0, 0
    num, k = text.num_experts, text.num_experts_per_tok
    router = expert = 0
    for name, p in model.named_parameters():
        group = models.group_of(name, family)
        if group == "router" and p.ndim >= 2:
            router += p.numel()
        elif group == "experts" and p.ndim >= 2:
            if p.shape[0] != num:
                raise ValueError(f"{name}: expected [num_experts={num}, ...], got {tuple(p.shape)}")
            expert += p.numel() // num * k
    return router, expert


def _leaves(model: torch.nn.Module, trainable: list[str]) -> set:
    """The trainable leaf groups (`llm` on a MoE model: dense, router, experts); top-level names as given when
    the model is not a family's (a test module)."""
    from training import models

    family = _family(model)
    return set(models.leaf_groups(trainable, family.leaf_groups)) if family else set(trainable)


def _family(model: torch.nn.Module):
    """The training/models.py family of an HF model, None for another module (a test's)."""
    from training import models

    return next((f for f in models.FAMILIES.values() if f.model_type == model.config.model_type), None)


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
    on = _leaves(model, trainable)
    mult = {"vision": 3 if "vision" in on else 1}
    mult["merger"] = 3 if "merger" in on else (2 if "vision" in on else 1)
    crossed = 2 if on else 1  # any trainable part lies below (or inside) the LLM: gradients cross all of it
    mult["llm"] = 3 if on & {"llm", "dense"} else crossed
    for part in ("router", "experts"):
        mult[part] = 3 if part in on else crossed
    router, expert = _moe_elems(model, text)
    return FlopModel(
        llm_linear=_linear_elems(inner.language_model.layers) + model.lm_head.weight.numel(),
        llm_layers=text.num_hidden_layers, llm_attn_dim=text.num_attention_heads * head_dim,
        vit_linear=vit_linear, vit_layers=vis.depth, vit_dim=vit_dim,
        vit_window_patches=(window // vis.patch_size) ** 2 if window and full_idx is not None else 0,
        vit_full_layers=len(full_idx) if full_idx is not None else vis.depth,
        merger_linear=sum(_linear_elems(m) for m in mergers), merge=vis.spatial_merge_size, mult=mult,
        router_linear=router, expert_linear=expert)
