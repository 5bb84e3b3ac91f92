"""Held-out evaluation of a model: caption loss and VQA answer accuracy on shapes samples training never sees.

Held-out means a different shapes seed (`EvalConfig.seed`): every shapes sample is a pure function of
(seed, index), so these images and questions are not in any training run that uses `data.seed`.

- caption loss: mean token cross-entropy over the supervised text tokens of caption documents.
- VQA accuracy: greedy decoding of the answer to colour and count questions, exact match after strip;
  `vqa_chance` is the accuracy of guessing uniformly among the answers of each question's kind.

`python -m training.evaluate PATH [--samples N] [--seed S] [--json OUT]` evaluates an hf/ export.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data import shapes
from data.encode import IGNORE
from training import models


@dataclass
class EvalConfig:
    samples: int = 48  # per task
    seed: int = 777_777  # shapes seed of the held-out samples (training uses data.seed, 1234 by default)
    max_new_tokens: int = 4


def encode(bundle: models.Bundle, record: dict, media: dict, key: str = "heldout") -> dict:
    """The one place this module touches data/encode.py: a RawSample (media as PIL images, which the encoder
    accepts) -> the first Encoded sample (input_ids, labels, mm_token_type_ids, pixel_values, image_grid_thw)."""
    from data.encode import EncoderConfig, build_encoder

    enc = getattr(bundle, "_eval_encoder", None)
    if enc is None:
        enc = bundle._eval_encoder = build_encoder(EncoderConfig(), bundle)
    return enc.encode({"key": key, "source": record.get("source", "shapes"), "record": record, "media": media})[0]


def _inputs(enc: dict, ids: torch.Tensor, mm: torch.Tensor) -> dict:
    inputs = dict(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], mm_token_type_ids=mm[None])
    if "pixel_values" in enc:
        inputs.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return inputs


def _held_out(cfg: EvalConfig, task: str) -> shapes.ShapesConfig:
    return dataclasses.replace(shapes.ShapesConfig(), seed=cfg.seed, tasks=[task])


@torch.no_grad()
def caption_loss(bundle: models.Bundle, cfg: EvalConfig) -> float:
    source = _held_out(cfg, "caption")
    total, count = 0.0, 0
    for i in range(cfg.samples):
        enc = encode(bundle, *shapes.sample(source, i), key=f"caption/{i}")
        logits = bundle.model(**_inputs(enc, enc["input_ids"], enc["mm_token_type_ids"]), use_cache=False).logits[0]
        target = enc["labels"][1:]
        ce = F.cross_entropy(logits[:-1].float(), target, ignore_index=IGNORE, reduction="sum")
        total, count = total + float(ce), count + int((target != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def vqa_accuracy(bundle: models.Bundle, cfg: EvalConfig) -> dict:
    """Greedy answers to held-out questions; the prompt is the encoded chat up to the first supervised token."""
    source = _held_out(cfg, "vqa")
    tok = bundle.tokenizer
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    right = {"colour": [], "count": []}
    chance = []
    examples = []
    for i in range(cfg.samples):
        record, media = shapes.sample(source, i)
        answer = record["messages"][-1]["content"][0]["text"].strip()
        kind = "count" if answer.isdigit() else "colour"
        enc = encode(bundle, record, media, key=f"vqa/{i}")
        start = int((enc["labels"] != IGNORE).nonzero()[0])
        ids, mm = enc["input_ids"][:start], enc["mm_token_type_ids"][:start]
        new = []
        for _ in range(cfg.max_new_tokens):  # no KV cache: a few tokens on a tiny prompt
            nxt = int(bundle.model(**_inputs(enc, ids, mm), use_cache=False).logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            ids, mm = torch.cat([ids, torch.tensor([nxt])]), torch.cat([mm, torch.zeros(1, dtype=mm.dtype)])
        said = tok.decode(new, skip_special_tokens=True).strip()
        right[kind].append(said == answer)
        chance.append(1 / source.max_shapes if kind == "count" else 1 / len(shapes.COLOURS))
        if len(examples) < 4:
            examples.append({"question": record["messages"][0]["content"][-1]["text"], "answer": answer,
                             "said": said})
    n = sum(len(v) for v in right.values())
    out = {"vqa_accuracy": sum(sum(v) for v in right.values()) / max(n, 1),
           "vqa_chance": sum(chance) / max(len(chance), 1), "vqa_examples": examples}
    out.update({f"vqa_accuracy_{k}": sum(v) / len(v) for k, v in right.items() if v})
    return out


def evaluate(model_cfg: models.ModelConfig, cfg: EvalConfig = EvalConfig()) -> dict:
    """Held-out metrics of the model `model_cfg` builds (an hf/ export via `path`, or the tiny random init)."""
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 forwards of a tiny model: extra threads only contend (10x slower here)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would cut through the pipeline's console view
        bundle = models.build(model_cfg)
        bundle.model.eval()
        out = {"caption_loss": caption_loss(bundle, cfg), **vqa_accuracy(bundle, cfg)}
    finally:
        torch.set_num_threads(threads)
    out.update(samples=cfg.samples, seed=cfg.seed, seconds=round(time.time() - t0, 2))
    return out


def family_of(path: Path) -> str:
    """The model family of an HF directory, from its config.json."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    for name, fam in models.FAMILIES.items():
        if fam.model_type == model_type:
            return name
    raise ValueError(f"{path}/config.json has model_type={model_type!r}, not a Qwen-VL family "
                     f"({sorted(models.FAMILIES)})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="an hf/ export (config.json, safetensors, tokenizer, preprocessor)")
    ap.add_argument("--samples", type=int, default=EvalConfig.samples)
    ap.add_argument("--seed", type=int, default=EvalConfig.seed)
    ap.add_argument("--json", help="also write the metrics to this file")
    a = ap.parse_args(argv)
    res = evaluate(models.ModelConfig(name="eval", family=family_of(Path(a.path)), path=a.path),
                   EvalConfig(samples=a.samples, seed=a.seed))
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
