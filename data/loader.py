"""A simple deterministic loader over an indexable source (the shapes set).

Each optimizer step takes `grad_accum * world * micro_batch` consecutive sample indices; rank r's
micro-batch m gets its own slice, so ranks never share or skip a sample and the position is one integer.
The streaming WebDataset pipeline (shards, mixtures, packing) replaces this behind the same interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data import shapes
from data.encode import IGNORE, Encoder


@dataclass
class Layout:
    """Who this process is and how a step is split; passed in, never read from the environment."""

    rank: int
    world: int
    micro_batch: int
    grad_accum: int
    seq_len: int


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pads a list of encoded samples into one micro-batch (one sample per row)."""
    L = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    sample_ids = torch.full((B, L), -1, dtype=torch.long)  # which sample each token belongs to (-1: padding)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n], mm[i, :n], sample_ids[i, :n] = (
            s["input_ids"], s["labels"], 1, s["mm_token_type_ids"], i)
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, mm_token_type_ids=mm,
                 sample_ids=sample_ids, sources=[s["source"] for s in samples])
    pix = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples if "image_grid_thw" in s])
    return batch


class IndexedLoader:
    """Yields the micro-batches of one optimizer step at a time; its state is the next global sample index."""

    def __init__(self, source_cfg: shapes.ShapesConfig, encoder: Encoder, layout: Layout, pad_id: int):
        self.cfg, self.encoder, self.layout, self.pad_id = source_cfg, encoder, layout, pad_id
        self.next_index = 0

    def _encode(self, index: int) -> dict:
        record, media = shapes.sample(self.cfg, index)
        raw = dict(key=f"{self.cfg.name}-{index}", source=record.get("source", self.cfg.name), record=record,
                   media=media)
        (enc,) = self.encoder.encode(raw)
        if len(enc["input_ids"]) > self.layout.seq_len:
            raise ValueError(f"shapes sample {index} has {len(enc['input_ids'])} tokens, more than "
                             f"stage.seq_len={self.layout.seq_len}; raise stage.seq_len or lower model.max_pixels")
        return enc

    def next_step(self) -> list[dict]:
        lay = self.layout
        base = self.next_index
        batches = []
        for m in range(lay.grad_accum):
            start = base + (m * lay.world + lay.rank) * lay.micro_batch
            batches.append(collate([self._encode(start + i) for i in range(lay.micro_batch)], self.pad_id))
        self.next_index = base + lay.grad_accum * lay.world * lay.micro_batch
        return batches

    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "world": self.layout.world,
                "micro_batch": self.layout.micro_batch, "grad_accum": self.layout.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        for k in ("world", "micro_batch", "grad_accum"):
            if state[k] != getattr(self.layout, k):
                raise ValueError(f"checkpoint was written with {k}={state[k]} but this run has "
                                 f"{k}={getattr(self.layout, k)}; resume with the same layout or start a new "
                                 f"output_dir")
        self.next_index = state["next_index"]
