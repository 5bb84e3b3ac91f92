"""First-fit packing of whole encoded samples into rows of at most `seq_len` tokens, and the collate that
turns rows into the micro-batch of data/README.md.

Driving it (the pipeline's loop):

    packer = PackConfig(seq_len=8192, pad_id=tok.pad_token_id).build()
    for raw in stream:
        for row in packer.add(encode(raw)):   # encode: RawSample -> list[Encoded] with position_ids
            ...                               # a finished row (list of Encoded); keep B of them
    rows += packer.flush()                    # end of data only: the rows still open
    batch = collate(rows[:B], cfg)

One `add()` call is one *unit*: what the encoder made of one RawSample. A unit is never split over rows,
so a preference record's chosen/rejected pair (same `group`) always shares a row. Open rows are bins;
a unit goes to the first open row with room (first-fit), else opens a row. A row that is exactly full
leaves at once; while more than `buffer_size` units are held, the fullest open row leaves (oldest on ties).

Boundaries: positions restart per sample (each sample carries its own data/rope.py ids). On CPU/SDPA the
model needs the block-diagonal causal mask (`attention_mask` [B, 1, L, L], as measured in DESIGN.md:
position ids alone do not isolate samples). That mask is O(L^2); with `attention="varlen"` it is left out
and `varlen_inputs(batch)` gives the flash-attention kwargs instead: rows flattened into one
[1, B*L] sequence and `cu_seq_lens_q/k` (int32, every sample and every row's padding one segment),
`max_length_q/k`. transformers 5.23 reads these from the model's **kwargs (FlashAttentionKwargs) in
`_flash_attention_forward` and calls `flash_attn_varlen_func`; `accepts_precomputed_kwargs` keeps them out
of the vision towers, which build their own per-image/per-frame `cu_seqlens` from `grid_thw`, so the ViT
attends within each image (each video frame) even when images of several samples are passed together.

Labels: the first token of every sample is set to IGNORE in the row. It is never a target within its own
sample, and this stops the previous sample's last token from being trained to predict it, so the usual
shifted loss over a packed row equals the sum of the samples' own losses.

State: the raw samples of the units still held (media bytes as base64) and the counters; restoring
re-encodes them, so the rows after a restore equal those of an uninterrupted run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from data.encode import IGNORE
from data.shards import decode_raw as raw_from_json  # one RawSample <-> JSON pair for shard buffers and packer
from data.shards import encode_raw as raw_to_json

_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
_REQUIRED = ("input_ids", "labels", "position_ids")
_STATE_KEYS = ("seq_len", "buffer_size", "overlong")


@dataclass
class PackConfig:
    seq_len: int = 8192
    buffer_size: int = 64  # units held open at most; more = better fill, more state
    overlong: Literal["drop", "truncate"] = "drop"
    pad_id: int = 0
    attention: Literal["dense", "varlen"] = "dense"  # dense: [B,1,L,L] mask (CPU/SDPA); varlen: cu_seqlens only

    def __post_init__(self):
        if self.seq_len < 1 or self.buffer_size < 1:
            raise ValueError(f"pack.seq_len={self.seq_len} and pack.buffer_size={self.buffer_size} must be >= 1")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"pack.overlong={self.overlong!r}; choose 'drop' or 'truncate'")
        if self.attention not in ("dense", "varlen"):
            raise ValueError(f"pack.attention={self.attention!r}; choose 'dense' (CPU/SDPA) or 'varlen' (flash)")

    def build(self) -> "Packer":
        return Packer(self)


class FirstFit:
    """Bounded first-fit over items with lengths; shared by the Packer and `fill_ratio`."""

    def __init__(self, capacity: int, buffer_size: int):
        self.capacity, self.buffer_size = capacity, buffer_size
        self.rows: list[list] = []
        self.lens: list[int] = []

    @property
    def held(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, item, n: int) -> list[list]:
        assert 0 < n <= self.capacity
        i = next((i for i, used in enumerate(self.lens) if used + n <= self.capacity), len(self.rows))
        if i == len(self.rows):
            self.rows.append([])
            self.lens.append(0)
        self.rows[i].append(item)
        self.lens[i] += n
        out = [self._pop(i)] if self.lens[i] == self.capacity else []
        while self.held > self.buffer_size:
            out.append(self._pop(max(range(len(self.lens)), key=lambda j: (self.lens[j], -j))))
        return out

    def flush(self) -> list[list]:
        out, self.rows, self.lens = self.rows, [], []
        return out

    def _pop(self, i: int) -> list:
        self.lens.pop(i)
        return self.rows.pop(i)


def _length(unit: list[dict]) -> int:
    return sum(len(s["input_ids"]) for s in unit)


def _has_media(sample: dict) -> bool:
    mm = sample.get("mm_token_type_ids")
    return any(k in sample for k in _MEDIA_KEYS) or (mm is not None and bool((mm != 0).any()))


def _truncate(sample: dict, n: int) -> dict:
    out = dict(sample)
    for k in ("input_ids", "labels", "mm_token_type_ids"):
        if k in out:
            out[k] = out[k][:n]
    out["position_ids"] = out["position_ids"][:, :n]
    return out


class Packer:
    """Streams units in, finished rows out; `stats` counts what went in, out, truncated and dropped."""

    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self._fit = FirstFit(cfg.seq_len, cfg.buffer_size)
        self.stats = {"units": 0, "samples": 0, "rows": 0, "tokens": 0, "truncated": {}, "dropped": {}}

    def add(self, samples: dict | list[dict]) -> list[list[dict]]:
        """Adds one unit (the encoder's output for one RawSample); returns the rows that are finished."""
        unit = self._prepare([samples] if isinstance(samples, dict) else list(samples), count=True)
        if unit is None:
            return []
        self.stats["units"] += 1
        self.stats["samples"] += len(unit)
        return self._rows(self._fit.add(unit, _length(unit)))

    def flush(self) -> list[list[dict]]:
        """End of data: every open row, however full."""
        return self._rows(self._fit.flush())

    @property
    def held(self) -> int:
        return self._fit.held

    def _rows(self, rows: list[list[list[dict]]]) -> list[list[dict]]:
        out = [[s for unit in row for s in unit] for row in rows]
        self.stats["rows"] += len(out)
        self.stats["tokens"] += sum(len(s["input_ids"]) for row in out for s in row)
        return out

    def _count(self, what: str, unit: list[dict], reason: str) -> None:
        per_source = self.stats[what].setdefault(str(unit[0].get("source", "default")), {})
        per_source[reason] = per_source.get(reason, 0) + len(unit)

    def _prepare(self, unit: list[dict], count: bool) -> list[dict] | None:
        """Checks a unit and applies the overlong policy; None (counted) when it is dropped."""
        for s in unit:
            missing = [k for k in _REQUIRED if k not in s]
            if missing:
                raise ValueError(f"sample {s.get('key', '?')!r} reached the packer without {missing}; the encode "
                                 f"step must return input_ids/labels and data.rope.attach its position_ids")
        n = _length(unit)
        if n == 0:
            reason = "empty"
        elif n <= self.cfg.seq_len:
            return unit
        elif self.cfg.overlong == "drop":
            reason = "too_long"
        elif len(unit) > 1:
            reason = "too_long_group"  # a chosen/rejected pair cannot be cut sensibly
        elif _has_media(unit[0]):
            reason = "too_long_media"  # never cut through an image or video
        elif unit[0].get("kind") == "prompt":
            reason = "too_long_prompt"  # an RL prompt cut short loses its question
        else:
            cut = _truncate(unit[0], self.cfg.seq_len)
            if bool((cut["labels"][1:] != IGNORE).any()) or not bool((unit[0]["labels"][1:] != IGNORE).any()):
                if count:
                    self._count("truncated", unit, "too_long")
                return [cut]
            reason = "too_long_no_labels_left"  # the supervised part lay beyond seq_len
        if count:
            self._count("dropped", unit, reason)
        return None

    def state_dict(self) -> dict:
        rows = []
        for row in self._fit.rows:
            units = []
            for unit in row:
                if "raw" not in unit[0]:
                    raise ValueError(f"sample {unit[0].get('key', '?')!r} has no 'raw': the packer cannot save "
                                     f"it; the encode step must keep the RawSample under sample['raw']")
                units.append({"raw": raw_to_json(unit[0]["raw"]), "length": _length(unit)})
            rows.append(units)
        return {**{k: getattr(self.cfg, k) for k in _STATE_KEYS}, "rows": rows, "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict, encode: Callable[[dict], list[dict]]) -> None:
        """Re-encodes the buffered raw samples; `encode` must be the function whose output add() was given."""
        for k in _STATE_KEYS:  # they decide which rows form; resuming with others would not be exact
            if state[k] != getattr(self.cfg, k):
                raise ValueError(f"packer state was written with {k}={state[k]!r} but this run has "
                                 f"pack.{k}={getattr(self.cfg, k)!r}; resume with the same value or start a new "
                                 f"output_dir")
        fit = FirstFit(self.cfg.seq_len, self.cfg.buffer_size)
        for saved in state["rows"]:
            row = []
            for entry in saved:
                raw = raw_from_json(entry["raw"])
                unit = self._prepare(list(encode(raw)), count=False)
                if unit is None or _length(unit) != entry["length"]:
                    raise ValueError(f"re-encoding buffered sample {raw.get('key', '?')!r} gave "
                                     f"{None if unit is None else _length(unit)} tokens, the checkpoint had "
                                     f"{entry['length']}: the encoder or its config changed since the checkpoint")
                row.append(unit)
            fit.rows.append(row)
            fit.lens.append(sum(_length(u) for u in row))
        self._fit = fit
        self.stats = copy.deepcopy(state["stats"])


def _meta(sample: dict) -> dict:
    meta = {"key": sample.get("key"), "source": sample.get("source", "default"), "group": sample.get("group"),
            "kind": sample.get("kind")}
    meta.update({k: sample[k] for k in ("answer", "reward") if k in sample})
    return meta


def collate(rows: list[list[dict]], cfg: PackConfig) -> dict:
    """Rows (lists of Encoded with position_ids) -> the micro-batch of data/README.md, rows padded to seq_len."""
    B, L = len(rows), cfg.seq_len
    input_ids = torch.full((B, L), cfg.pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    sample_ids = torch.full((B, L), -1, dtype=torch.long)
    sample_sup = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.zeros((3, B, L), dtype=torch.long)
    segments: list[int] = []  # lengths of the attention segments of the flattened [B*L] sequence
    samples = []
    for b, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            if at + n > L:
                raise ValueError(f"row {b} holds {sum(len(x['input_ids']) for x in row)} tokens, more than "
                                 f"pack.seq_len={L}; collate rows made by a Packer with the same seq_len")
            lab = s["labels"].clone()
            lab[:1] = IGNORE  # not a target of its own sample; keeps the previous sample from predicting it
            sid = len(samples)
            input_ids[b, at:at + n], labels[b, at:at + n], sample_ids[b, at:at + n] = s["input_ids"], lab, sid
            sample_sup[b, at:at + n] = int((lab != IGNORE).sum())
            if "mm_token_type_ids" in s:
                mm[b, at:at + n] = s["mm_token_type_ids"]
            position_ids[:, b, at:at + n] = s["position_ids"]
            segments.append(n)
            samples.append(s)
            at += n
        if at < L:  # padding is its own causal segment: a fully masked query row would give NaN in SDPA
            position_ids[:, b, at:] = torch.arange(L - at)
            segments.append(L - at)
    batch = dict(input_ids=input_ids, labels=labels, mm_token_type_ids=mm, sample_ids=sample_ids,
                 sample_sup=sample_sup, position_ids=position_ids)
    seg = torch.tensor(segments, dtype=torch.int32)
    batch["cu_seqlens"] = torch.nn.functional.pad(seg.cumsum(0, dtype=torch.int32), (1, 0))
    batch["max_seqlen"] = int(seg.max()) if len(segments) else 0
    if cfg.attention == "dense":
        batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"], B, L)
    for key in _MEDIA_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    _second_per_grid(batch, samples)
    _teacher_outputs(batch, samples)
    batch["sources"] = [str(s.get("source", "default")) for s in samples]
    batch["meta"] = [_meta(s) for s in samples]
    return batch


def _teacher_outputs(batch: dict, samples: list[dict]) -> None:
    """Stored teacher top-k rows (data/teacher.py) in the model step's order of supervised tokens: sample by
    sample, each cut to the targets left after truncation (a prefix). Only when every sample has them."""
    if not samples or not all("teacher_ids" in s for s in samples):
        return
    ks = {s["teacher_ids"].shape[1] for s in samples}
    if len(ks) > 1:
        raise ValueError(f"samples {[s.get('key') for s in samples]} carry teacher outputs of different top-k "
                         f"{sorted(ks)}; the objective trims them to stage.objective.top_k first")
    n = [int((s["labels"][1:] != IGNORE).sum()) for s in samples]
    batch["teacher_ids"] = torch.cat([s["teacher_ids"][:k] for s, k in zip(samples, n)])
    batch["teacher_logps"] = torch.cat([s["teacher_logps"][:k] for s, k in zip(samples, n)])


def _second_per_grid(batch: dict, samples: list[dict]) -> None:
    with_video = [s for s in samples if "video_grid_thw" in s]
    have = [s for s in with_video if "second_per_grid_ts" in s]
    if not have:
        return
    if len(have) != len(with_video):
        keys = [s.get("key") for s in with_video if "second_per_grid_ts" not in s]
        raise ValueError(f"samples {keys} have videos but no second_per_grid_ts while others do; the encoder "
                         f"must set it for every Qwen2.5-VL video")
    batch["second_per_grid_ts"] = torch.cat([torch.as_tensor(s["second_per_grid_ts"], dtype=torch.float32)
                                             for s in have])


def block_causal_mask(cu_seqlens: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """BoolTensor[B, 1, L, L]: causal within each segment of the flattened rows, False across segments."""
    seg = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    seg = seg.view(B, L)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return (same & causal)[:, None]


def packed_position_ids(batch: dict) -> torch.Tensor:
    """LongTensor[4, B, L]: a text row (0.. restarting at every segment) above the 3 M-RoPE rows.

    transformers 5.23 (all three families) reads row 0 of a 4-row input as `text_position_ids`: with
    `attention_mask=None` and no cache (`use_cache=False`) `create_causal_mask` finds the segments from it
    (`find_packed_sequence_indices`) and builds the block-causal mask itself; with flash attention and batch 1
    `_is_packed_sequence` turns it into cu_seqlens. With the default use_cache=True a DynamicCache exists and
    the packed detection is skipped, so samples leak (the DESIGN.md measurement); our 4D mask has no such trap.
    """
    B, L = batch["input_ids"].shape
    seg = batch["cu_seqlens"]
    text = torch.cat([torch.arange(int(n)) for n in seg[1:] - seg[:-1]]).view(1, B, L)
    return torch.cat([text, batch["position_ids"]])


def varlen_inputs(batch: dict, impl: str = "flash_attention_2") -> dict:
    """Model kwargs for attn_implementation flash_attention_2/3 (GPU): rows flattened to one [1, B*L] sequence
    (every row starts a segment, so labels can be flattened too), boundaries given explicitly as
    `cu_seq_lens_q/k` + `max_length_q/k` (HF passes them through **kwargs to `_flash_attention_forward`,
    which calls `flash_attn_varlen_func`), no attention_mask (its presence would make HF unpad by it instead).
    The 4-row position ids carry the same boundaries for HF's own inference. impl="sdpa_varlen" (CPU/SDPA,
    training/attention.py) takes the same cu_seq_lens."""
    B, L = batch["input_ids"].shape
    out = dict(input_ids=batch["input_ids"].reshape(1, B * L),
               mm_token_type_ids=batch["mm_token_type_ids"].reshape(1, B * L),
               cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
               max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"], use_cache=False)
    out.update({k: batch[k] for k in (*_MEDIA_KEYS, "second_per_grid_ts") if k in batch})
    if impl == "sdpa_varlen":  # training/attention.py: M-RoPE rows only, and an all-ones mask so that HF neither
        # looks for packed segments in the position ids nor builds an L x L mask (it skips an all-ones one)
        out["position_ids"] = batch["position_ids"].reshape(3, 1, B * L)
        out["attention_mask"] = torch.ones(1, B * L, dtype=torch.long)
    else:  # the text row on top is read per segment, one host loop over the segments: only where it is used
        out["position_ids"] = packed_position_ids(batch).reshape(4, 1, B * L)
    return out


def fill_ratio(lengths: Iterable[int], seq_len: int, buffer_size: int = 64) -> float:
    """Tokens / (rows x seq_len) of the rows this packer's first-fit makes from these sample lengths
    (overlong ones dropped). The data benchmark's packing figure."""
    fit, rows, tokens = FirstFit(seq_len, buffer_size), 0, 0
    for n in lengths:
        if 0 < n <= seq_len:
            tokens += n
            rows += len(fit.add(n, n))
    rows += len(fit.flush())
    return tokens / (rows * seq_len) if rows else 0.0


def padded_fill(lengths: Iterable[int], batch_size: int) -> float:
    """The baseline: consecutive batches of `batch_size` samples, each padded to its longest sample."""
    lengths = list(lengths)
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    slots = sum(len(b) * max(b) for b in batches)
    return sum(lengths) / slots if slots else 0.0
