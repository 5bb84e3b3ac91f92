"""Per-sample 3-axis M-RoPE position ids, computed without the model (pure torch).

The packer concatenates samples in one row, so positions must restart per sample: HF's `get_rope_index`
run on the packed row would count one long sequence. `position_ids(spec, sample)` reproduces transformers
5.23 `Qwen2VLModel` / `Qwen2_5_VLModel` / `Qwen3VLModel.get_rope_index` on that sample alone:

- the sample splits into runs of equal `mm_token_type_ids` (0 text, 1 image, 2 video);
- a text run of n tokens gets `pos .. pos+n-1` on all three axes; pos += n;
- a vision run gets (t, h, w) over the merged grid (h, w divided by spatial_merge_size), h and w offset by
  pos, t by pos after the time scaling; then pos += max(h, w) / merge (HF 5.23's rule, not max+1);
- Qwen2.5-VL videos scale t by `tokens_per_second * second_per_grid_t` (then `.long()`, as HF does, in the
  dtype of `second_per_grid_ts`); images and the other families use 1;
- Qwen3-VL videos: each temporal patch is its own vision run (the text timestamp `<t seconds>` separates
  them), so `video_grid_thw` rows split into t rows of (1, h, w) and time lives only in the text.

Unlike HF, a run whose length is not its grid's token count raises `BadSample("token_count_mismatch")`
instead of producing misaligned ids (HF would fail later, or silently for two adjacent images).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from data.errors import BadSample

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# model_type of the HF config -> the get_rope_index rule it uses (Qwen3VLMoeModel's is Qwen3VLModel's)
_RULES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class RopeSpec:
    """What `get_rope_index` reads from the model config; build it once per run with `from_config`."""

    family: Family
    spatial_merge_size: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    tokens_per_second: Optional[float] = None  # Qwen2.5-VL only (vision_config.tokens_per_second)

    @classmethod
    def from_config(cls, config) -> "RopeSpec":
        model_type = getattr(config, "model_type", None)
        if model_type not in _RULES:
            raise ValueError(f"RopeSpec.from_config: model_type={model_type!r} has no M-RoPE rule here; "
                             f"supported: {sorted(_RULES)}")
        family = _RULES[model_type]
        vision = config.vision_config
        tps = getattr(vision, "tokens_per_second", None) if family == "qwen2_5_vl" else None
        if family == "qwen2_5_vl" and tps is None:
            raise ValueError("RopeSpec.from_config: Qwen2.5-VL config has no vision_config.tokens_per_second; "
                             "set it (released checkpoints use 2)")
        return cls(family=family, spatial_merge_size=int(vision.spatial_merge_size),
                   image_token_id=int(config.image_token_id), video_token_id=int(config.video_token_id),
                   vision_start_token_id=int(config.vision_start_token_id), tokens_per_second=tps)


def token_types(spec: RopeSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """mm_token_type_ids as the HF processors write them (0 text, 1 image pad, 2 video pad)."""
    return (input_ids == spec.image_token_id).long() + VIDEO * (input_ids == spec.video_token_id).long()


def _vision_ids(start: int, t: int, h: int, w: int, interval) -> torch.Tensor:
    """HF get_vision_position_ids with temp_merge_size 1 and an already merged (h, w)."""
    tt = (torch.arange(t) * interval).long()
    hh, ww = torch.arange(h) + start, torch.arange(w) + start
    grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)
    grid[0] += start  # after the time scaling, as HF does
    return grid


def _grids(spec: RopeSpec, sample: dict) -> dict[int, list]:
    """Per modality, the (t, h, w, time interval) of each vision run in order."""
    images = sample.get("image_grid_thw")
    videos = sample.get("video_grid_thw")
    out = {IMAGE: [(int(t), int(h), int(w), 1) for t, h, w in images.tolist()] if images is not None else [],
           VIDEO: []}
    if videos is None:
        return out
    seconds = sample.get("second_per_grid_ts")
    for i, (t, h, w) in enumerate(videos.tolist()):
        if spec.family == "qwen3_vl":
            out[VIDEO] += [(1, h, w, 1)] * t
        elif spec.family == "qwen2_5_vl":
            # HF: tokens_per_second * second_per_grid_ts[i] (a 0-d tensor), or * 1 when none is given
            sec = seconds[i] if seconds is not None else 1
            out[VIDEO].append((t, h, w, spec.tokens_per_second * sec))
        else:
            out[VIDEO].append((t, h, w, 1))
    return out


def position_ids(spec: RopeSpec, sample: dict) -> torch.Tensor:
    """LongTensor[3, n]: the sample's M-RoPE ids, equal to HF get_rope_index on this sample alone."""
    ids = sample["input_ids"]
    key = str(sample.get("key", "?"))
    types = sample.get("mm_token_type_ids")
    types = token_types(spec, ids) if types is None else types
    grids = _grids(spec, sample)
    used = {IMAGE: 0, VIDEO: 0}
    m = spec.spatial_merge_size
    parts, pos = [], 0
    for kind, run in itertools.groupby(types.tolist()):
        n = sum(1 for _ in run)
        if kind == TEXT:
            parts.append(torch.arange(pos, pos + n).expand(3, n))
            pos += n
            continue
        name = "image" if kind == IMAGE else "video"
        if used[kind] >= len(grids[kind]):
            raise BadSample("token_count_mismatch", key, f"more {name} token runs than {name} grids "
                            f"({len(grids[kind])}); is a pad run split, or a grid missing?")
        t, h, w, interval = grids[kind][used[kind]]
        used[kind] += 1
        if n != t * h * w // (m * m):
            raise BadSample("token_count_mismatch", key, f"{name} run {used[kind] - 1} has {n} tokens, its grid "
                            f"{(t, h, w)} needs {t * h * w // (m * m)} (two adjacent {name}s without text between?)")
        parts.append(_vision_ids(pos, t, h // m, w // m, interval))
        pos += max(h, w) // m
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        if used[kind] != len(grids[kind]):
            raise BadSample("token_count_mismatch", key,
                            f"{len(grids[kind])} {name} grids but {used[kind]} {name} token runs")
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(parts, dim=1)


def attach(spec: RopeSpec, sample: dict) -> dict:
    """The pipeline's rope step: adds `position_ids` in place and returns the sample."""
    sample["position_ids"] = position_ids(spec, sample)
    return sample
