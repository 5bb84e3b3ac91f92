"""Regenerates the tiny byte-level BPE tokenizer shipped for the tiny model presets.

No model hub is reachable from CI, so the tiny presets need a tokenizer committed in the repo. It carries
the real Qwen special tokens (same strings, small ids) so chat templates, pad-token expansion and label
masking run the same code paths as with a real Qwen checkpoint. Run: python -m training.assets.make_tiny_tokenizer
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).parent
OUT = HERE / "tiny_tokenizer"
VOCAB_SIZE = 1024  # BPE merges + 256 bytes; special tokens come on top

# The Qwen2-VL / Qwen2.5-VL / Qwen3-VL special tokens, in the order of the real vocabulary.
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen3 adds these as (non-special) added tokens.
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]

COLOURS = "red green blue yellow orange purple white black grey pink brown cyan"
SHAPES = "circle circles square squares triangle triangles shape shapes star stars"
CORPUS = f"""
system user assistant You are a helpful assistant.
{COLOURS} {SHAPES}
A picture of a red circle and a blue square on a white background. There are 3 shapes in the image.
What colour is the circle? How many shapes are there? Describe the image. Where is the triangle?
The answer is 0 1 2 3 4 5 6 7 8 9 10 100 1000 seconds frame video moving left right up down top bottom.
bbox_2d label point_2d {{"bbox_2d": [12, 34, 56, 78], "label": "red circle"}} (0,0),(999,999)
The quick brown fox jumps over the lazy dog. Vision language models read images and text together.
Question: Answer: Yes No yes no correct wrong which option A B C D is the best answer?
"""


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 50, trainer=trainer)
    tok.add_tokens(ADDED)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "extra_special_tokens": [],
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT} with {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
