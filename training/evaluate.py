"""Held-out evaluation of a model: caption loss and VQA answer accuracy on shapes samples training never sees.

Held-out means a different shapes seed (`EvalConfig.seed`): every shapes sample is a pure function of
(seed, index), so these images and questions are not in any training run that uses `data.seed`.

- caption loss: mean token cross-entropy over the supervised text tokens of caption documents.
- VQA accuracy: greedy decoding of the answer to colour and count questions, exact match after strip;
  `vqa_chance` is the accuracy of guessing uniformly among the answers of each question's kind.
- preference: held-out (chosen, rejected) pairs; `pref_margins` is log p(chosen) - log p(rejected) per pair
  (summed reply tokens), `pref_accuracy` the share of pairs the model itself prefers the right way. DPO's
  preference accuracy on held-out pairs, (margin - reference margin) > 0, needs the starting model's margins:
  `dpo_accuracy(start, end)` computes it from two evaluations.
- RL reward: answers to held-out RL prompts scored by each record's own reward function (stages/rewards.py),
  as SAPO is rewarded in training: the greedy answer (`rl_reward`), and the mean over answers sampled at
  temperature 1 (`rl_reward_sampled`), the policy's expected reward, which is what RL raises first.

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

from data import shapes
from data.encode import IGNORE
from training import models
from training.vlm import VLM


@dataclass
class EvalConfig:
    samples: int = 48  # per task
    seed: int = 777_777  # shapes seed of the held-out samples (training uses data.seed, 1234 by default)
    max_new_tokens: int = 4
    rl_samples: int = 4  # answers sampled per held-out RL prompt (0: greedy only)


def _encoder(bundle: models.Bundle):
    """The one place this module touches data/encode.py: the family's encoder, built once per model."""
    from data.encode import EncoderConfig, build_encoder

    if getattr(bundle, "_eval_encoder", None) is None:
        bundle._eval_encoder = build_encoder(EncoderConfig(), bundle)
    return bundle._eval_encoder


def encode(bundle: models.Bundle, record: dict, media: dict, key: str = "heldout") -> list[dict]:
    """A RawSample (media as PIL images or bytes, which the encoder accepts) -> its Encoded samples
    (input_ids, labels, mm_token_type_ids, pixel_values, image_grid_thw): two for a preference pair, else one."""
    return _encoder(bundle).encode({"key": key, "source": record.get("source", "shapes"), "record": record,
                                    "media": media})


def _inputs(enc: dict, ids: torch.Tensor, mm: torch.Tensor) -> dict:
    inputs = dict(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], mm_token_type_ids=mm[None])
    if "pixel_values" in enc:
        inputs.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return inputs


def _nll(bundle: models.Bundle, enc: dict) -> tuple[float, int]:
    """(summed cross-entropy of the supervised tokens, their count): the training step's chunked loss path."""
    batch = _inputs(enc, enc["input_ids"], enc["mm_token_type_ids"])
    batch["labels"] = enc["labels"][None]
    ce, _ = VLM(bundle.model)(batch, nll=True)
    return float(ce.sum()), int((enc["labels"][1:] != IGNORE).sum())


def _held_out(cfg: EvalConfig, task: str) -> shapes.ShapesConfig:
    return dataclasses.replace(shapes.ShapesConfig(), seed=cfg.seed, tasks=[task])


@torch.no_grad()
def caption_loss(bundle: models.Bundle, cfg: EvalConfig) -> float:
    source = _held_out(cfg, "caption")
    total, count = 0.0, 0
    for i in range(cfg.samples):
        ce, n = _nll(bundle, encode(bundle, *shapes.sample(source, i), key=f"caption/{i}")[0])
        total, count = total + ce, count + n
    return total / max(count, 1)


VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def _next_logits(bundle: models.Bundle, logits: torch.Tensor) -> torch.Tensor:
    """Last-position logits with the vision placeholders masked: a generated <|image_pad|> would have no image
    features behind it (an early model does emit them), exactly as the RL rollouts forbid them."""
    banned = [bundle.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    out = logits[:, -1].float()
    out[:, banned] = float("-inf")
    return out


def _greedy(bundle: models.Bundle, enc: dict, ids: torch.Tensor, mm: torch.Tensor, cfg: EvalConfig) -> str:
    """The model's greedy continuation of the prompt `ids`, decoded and stripped."""
    tok = bundle.tokenizer
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    new = []
    for _ in range(cfg.max_new_tokens):  # no KV cache: a few tokens on a tiny prompt
        nxt = int(_next_logits(bundle, bundle.model(**_inputs(enc, ids, mm), use_cache=False,
                                                            logits_to_keep=1).logits)[0].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        ids, mm = torch.cat([ids, torch.tensor([nxt])]), torch.cat([mm, torch.zeros(1, dtype=mm.dtype)])
    return tok.decode(new, skip_special_tokens=True).strip()


def _generated(cfg: EvalConfig, task: str, i: int) -> tuple[dict, dict]:
    """Held-out record `i` of a shapes task the in-memory `shapes.sample` does not know (preference, rl)."""
    return shapes.generate(shapes.ShapesConfig(seed=cfg.seed), task, i, split="heldout")


@torch.no_grad()
def preference(bundle: models.Bundle, cfg: EvalConfig) -> dict:
    """log p(chosen) - log p(rejected) of each held-out pair, summed over the reply tokens, as DPO scores them."""
    margins = []
    for i in range(cfg.samples):
        record, media = _generated(cfg, "preference", i)
        logp = []
        for s in encode(bundle, record, media, key=f"preference/{i}"):
            logp.append(-_nll(bundle, s)[0])
        margins.append(logp[0] - logp[1])
    return {"pref_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1), "pref_margins": margins}


def dpo_accuracy(start: dict, end: dict) -> float | None:
    """DPO's held-out preference accuracy of the model evaluated in `end` with the one in `start` as reference:
    the share of pairs whose implicit reward margin, (log-ratio of chosen) - (log-ratio of rejected), is > 0."""
    a, b = (start or {}).get("pref_margins"), (end or {}).get("pref_margins")
    if not a or not b or len(a) != len(b):
        return None
    return sum(e - s > 0 for s, e in zip(a, b)) / len(a)


def _sampled(bundle: models.Bundle, enc: dict, cfg: EvalConfig, gen: torch.Generator) -> list[str]:
    """`cfg.rl_samples` completions of one prompt sampled at temperature 1 (the policy's own distribution), as a
    batch: the prompt, its image rows and its grid repeated."""
    tok, k = bundle.tokenizer, cfg.rl_samples
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    ids, mm = enc["input_ids"][None].repeat(k, 1), enc["mm_token_type_ids"][None].repeat(k, 1)
    extra = {key: enc[key].repeat(k, 1) for key in ("pixel_values", "image_grid_thw") if key in enc}
    out, live = [[] for _ in range(k)], [True] * k
    for _ in range(cfg.max_new_tokens):
        logits = _next_logits(bundle, bundle.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   mm_token_type_ids=mm, **extra, use_cache=False,
                                                   logits_to_keep=1).logits)
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        for j, t in enumerate(nxt.tolist()):
            live[j] = live[j] and t not in stop
            if live[j]:
                out[j].append(t)
        if not any(live):
            break
        ids, mm = torch.cat([ids, nxt[:, None]], 1), torch.cat([mm, torch.zeros(k, 1, dtype=mm.dtype)], 1)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in out]


@torch.no_grad()
def rl_reward(bundle: models.Bundle, cfg: EvalConfig, registry: dict | None = None) -> dict:
    """Mean reward on held-out RL prompts, each scored by its record's reward function: of the greedy answer, and
    of `rl_samples` answers sampled at temperature 1 (the expected reward RL maximises; seeded). Records may
    name only registered rewards: the built-ins, plus `registry` ({name: 'pkg.mod:fn'}) when given."""
    from stages.rewards import Rewards

    rewards, greedy, sampled = Rewards(registry=registry), 0.0, 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in range(cfg.samples):
        record, media = _generated(cfg, "rl", i)
        enc = encode(bundle, record, media, key=f"rl/{i}")[0]
        greedy += rewards(_greedy(bundle, enc, enc["input_ids"], enc["mm_token_type_ids"], cfg), record)
        if cfg.rl_samples:
            sampled += sum(rewards(t, record) for t in _sampled(bundle, enc, cfg, gen)) / cfg.rl_samples
    n = max(cfg.samples, 1)
    return {"rl_reward": greedy / n, **({"rl_reward_sampled": sampled / n} if cfg.rl_samples else {})}


@torch.no_grad()
def vqa_accuracy(bundle: models.Bundle, cfg: EvalConfig) -> dict:
    """Greedy answers to held-out questions; the prompt is the encoded chat up to the first supervised token."""
    source = _held_out(cfg, "vqa")
    right = {"colour": [], "count": []}
    chance = []
    examples = []
    for i in range(cfg.samples):
        record, media = shapes.sample(source, i)
        answer = record["messages"][-1]["content"][0]["text"].strip()
        kind = "count" if answer.isdigit() else "colour"
        enc = encode(bundle, record, media, key=f"vqa/{i}")[0]
        start = int((enc["labels"] != IGNORE).nonzero()[0])
        said = _greedy(bundle, enc, enc["input_ids"][:start], enc["mm_token_type_ids"][:start], cfg)
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


@torch.no_grad()
def teacher_kl(bundle: models.Bundle, teacher: models.Bundle, cfg: EvalConfig) -> float:
    """Mean per-token KL(teacher ‖ model) on the answers of the held-out VQA samples (stages/distill.py's
    forward KL at temperature 1, over the full vocabulary): how far the model is from a distillation teacher."""
    from stages.distill import divergence

    source = _held_out(cfg, "vqa")
    total, count = 0.0, 0
    for i in range(cfg.samples):
        enc = encode(bundle, *shapes.sample(source, i), key=f"vqa/{i}")[0]
        inputs = _inputs(enc, enc["input_ids"], enc["mm_token_type_ids"])
        sup = enc["labels"][1:] != IGNORE
        zs = bundle.model(**inputs, use_cache=False).logits[0, :-1][sup].float()
        zt = teacher.model(**inputs, use_cache=False).logits[0, :-1][sup].float()
        V = min(zs.shape[-1], zt.shape[-1])
        total, count = total + float(divergence(zs[:, :V], zt[:, :V], 0.0).sum()), count + int(sup.sum())
    return total / max(count, 1)


def evaluate(model_cfg: models.ModelConfig, cfg: EvalConfig = EvalConfig(), teacher: str | None = None) -> dict:
    """Held-out metrics of the model `model_cfg` builds (an hf/ export via `path`, or the tiny random init); with
    `teacher` (an hf/ export of the same family and tokenizer) also `teacher_kl`."""
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 forwards of a tiny model: extra threads only contend (10x slower here)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would cut through the pipeline's console view
        bundle = models.build(model_cfg)
        bundle.model.eval()
        out = {"caption_loss": caption_loss(bundle, cfg), **vqa_accuracy(bundle, cfg), **preference(bundle, cfg),
               **rl_reward(bundle, cfg)}
        if teacher is not None:
            t = models.build(dataclasses.replace(model_cfg, name="teacher", path=teacher, tiny={}))
            t.model.eval()
            out["teacher_kl"] = teacher_kl(bundle, t, cfg)
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
