"""Encoder and loader: labels only where the record says, pad tokens expanded to the merged-patch count, boxes
in each family's format, preference and RL records, videos the HF model accepts, bad data as BadSample, and
the loader hands every rank distinct samples."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import shapes
from data.encode import IGNORE, LAYOUT, Encoder, EncoderConfig, build_encoder
from data.errors import BadSample
from data.video import write_mp4
from training.models import FAMILIES, ModelConfig, build


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    return build(ModelConfig(family=request.param))


def _enc(bundle, **kw):
    return build_encoder(EncoderConfig(**kw), bundle)


def _raw(record, media, key="k0", source="src"):
    return dict(key=key, source=source, record=record, media=media)


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def _png(w=100, h=60, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _video(n=8, h=64, w=96) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    return write_mp4(np.stack([np.dstack([(x * 2 + 9 * t) % 256, y * 3 % 256, (x + y) % 256])
                               for t in range(n)]).astype(np.uint8), fps=4)


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image", "image": "0.png"}


def test_chat_supervises_exactly_the_assistant_reply_and_im_end(bundle):
    rec = {"messages": [_user(IMG, {"type": "text", "text": "What colour?"}), _assistant("red"),
                        _user({"type": "text", "text": "How many shapes?"}), _assistant("2")]}
    (out,) = _enc(bundle).encode(_raw(rec, {"0.png": _png()}))
    ids, labels = out["input_ids"], out["labels"]
    assert _text(bundle.tokenizer, ids[labels != IGNORE]) == "red<|im_end|>2<|im_end|>"
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()
    assert out["key"] == "k0" and out["source"] == "src" and out["kind"] is None and out["raw"]["record"] is rec


def test_image_pads_match_the_merged_patch_count(bundle):
    rec, media = shapes.sample(shapes.ShapesConfig(tasks=["caption"]), 3)
    (out,) = _enc(bundle).encode(_raw(rec, media))
    grid = out["image_grid_thw"]
    n_pad = int((out["input_ids"] == bundle.model.config.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 4 > 0
    assert out["pixel_values"].shape[0] == int(grid.prod())
    assert int((out["mm_token_type_ids"] == 1).sum()) == n_pad


def test_document_supervises_all_text_but_not_image_pads(bundle):
    rec, media = shapes.sample(shapes.ShapesConfig(tasks=["caption"]), 5)
    (out,) = _enc(bundle).encode(_raw(rec, media))
    ids, labels = out["input_ids"], out["labels"]
    pads = ids == bundle.model.config.image_token_id
    assert (labels[pads] == IGNORE).all() and (labels[~pads] == ids[~pads]).all()
    assert _text(bundle.tokenizer, ids[~pads]).endswith(rec["content"][1]["text"] + "<|endoftext|>")


BOXES = {  # image 100x60 (Qwen2.5-VL: smart_resize to 112x56 with the tiny processor's bounds)
    "qwen2_vl": "<|object_ref_start|>red square<|object_ref_end|><|box_start|>(100,167),(500,1000)<|box_end|>",
    "qwen2_5_vl": json.dumps({"bbox_2d": [11, 9, 56, 55], "label": "red square"}),
    "qwen3_vl": json.dumps({"bbox_2d": [100, 167, 500, 1000], "label": "red square"}),
}


def test_boxes_are_rendered_in_the_family_format(bundle):
    """Formats: Qwen2-VL special-token boxes on 0-1000 (Qwen2-VL report / model card grounding example);
    Qwen2.5-VL `{"bbox_2d": [...], "label": ...}` in resized-image pixels (Qwen2.5-VL spatial-understanding
    cookbook); Qwen3-VL the same JSON on 0-1000 (Qwen3-VL qwen-vl-finetune grounding data format)."""
    box = {"type": "box", "box": [10, 10, 50, 60], "label": "red square"}
    rec = {"messages": [_user(IMG, {"type": "text", "text": "Where is the red square?"}),
                        {"role": "assistant", "content": [box]}]}
    (out,) = _enc(bundle).encode(_raw(rec, {"0.png": _png()}))
    assert tuple(out["image_grid_thw"][0].tolist()) == ((1, 4, 8) if bundle.family.patch_size == 14 else (1, 4, 6))
    supervised = _text(bundle.tokenizer, out["input_ids"][out["labels"] != IGNORE])
    assert supervised == BOXES[LAYOUT[bundle.family.name]] + "<|im_end|>"  # the MoE family: Qwen3-VL's


def test_preference_record_gives_two_samples_of_one_group(bundle):
    rec = {"messages": [_user(IMG, {"type": "text", "text": "Colour?"})], "chosen": _assistant("red"),
           "rejected": _assistant("blue")}
    chosen, rejected = _enc(bundle).encode(_raw(rec, {"0.png": _png()}, key="p1"))
    assert (chosen["kind"], rejected["kind"]) == ("chosen", "rejected") and chosen["group"] == rejected["group"]
    tok = bundle.tokenizer
    assert _text(tok, chosen["input_ids"][chosen["labels"] != IGNORE]) == "red<|im_end|>"
    assert _text(tok, rejected["input_ids"][rejected["labels"] != IGNORE]) == "blue<|im_end|>"
    n = len(chosen["input_ids"]) - 3  # same prompt tokens before the replies
    assert torch.equal(chosen["input_ids"][:n], rejected["input_ids"][:n])
    other = _enc(bundle).encode(_raw(rec, {"0.png": _png()}, key="p2"))[0]
    assert other["group"] != chosen["group"]


def test_preference_supervises_only_the_final_reply_of_a_multi_turn_prompt(bundle):
    rec = {"messages": [_user({"type": "text", "text": "hi"}), _assistant("hello"), _user({"type": "text",
           "text": "colour?"})], "chosen": _assistant("red"), "rejected": _assistant("blue")}
    chosen, _ = _enc(bundle).encode(_raw(rec, {}))
    assert _text(bundle.tokenizer, chosen["input_ids"][chosen["labels"] != IGNORE]) == "red<|im_end|>"


def test_rl_record_is_an_unsupervised_generation_prompt(bundle):
    rec = {"messages": [_user(IMG, {"type": "text", "text": "How many shapes?"})], "answer": "2",
           "reward": "exact_match"}
    (out,) = _enc(bundle).encode(_raw(rec, {"0.png": _png()}))
    assert out["kind"] == "prompt" and out["answer"] == "2" and out["reward"] == "exact_match"
    assert (out["labels"] == IGNORE).all()
    assert _text(bundle.tokenizer, out["input_ids"]).endswith("<|im_start|>assistant\n")


def test_video_sample_runs_through_the_hf_model(bundle):
    """Pad counts, grids and (Qwen2.5-VL) second_per_grid_ts are what the model's forward accepts; Qwen3-VL
    gets one timestamped vision block per temporal patch."""
    rec = {"messages": [_user({"type": "video", "video": "0.mp4"}, IMG, {"type": "text", "text": "What moves?"}),
                        _assistant("a bar")]}
    (out,) = _enc(bundle, video_max_frames=4).encode(_raw(rec, {"0.mp4": _video(), "0.png": _png()}))
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 2 and int((out["input_ids"] == bundle.model.config.video_token_id).sum()) == t * h * w // 4
    assert out["pixel_values_videos"].shape[0] == t * h * w
    text = _text(bundle.tokenizer, out["input_ids"])
    if LAYOUT[bundle.family.name] == "qwen3_vl":  # and qwen3_vl_moe
        # frames 0, 2, 5, 7 of 8 at 4 fps: patches centred at 0.25 s and 1.5 s
        assert text.count("<|vision_start|>") == t + 1 and text.startswith(
            "<|im_start|>user\n<0.2 seconds><|vision_start|><|video_pad|>") and "<|vision_end|><1.5 seconds>" in text
    else:
        assert "seconds>" not in text and text.count("<|vision_start|>") == 2
    assert ("second_per_grid_ts" in out) == (bundle.family.name == "qwen2_5_vl")
    if "second_per_grid_ts" in out:
        assert out["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch at 2 sampled frames/s
    keys = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw", "second_per_grid_ts")
    inputs = {k: out[k][None] if k in ("input_ids", "mm_token_type_ids") else out[k] for k in keys if k in out}
    logits = bundle.model(**inputs).logits
    assert logits.shape[1] == len(out["input_ids"]) and torch.isfinite(logits).all()


def _reason(bundle, rec, media):
    with pytest.raises(BadSample) as e:
        _enc(bundle).encode(_raw(rec, media, key="bad1"))
    assert e.value.key == "bad1"
    return e.value.reason


def test_bad_data_raises_bad_sample_with_its_reason(bundle):
    q = {"type": "text", "text": "q"}
    assert _reason(bundle, {"content": [{"type": "image", "image": "7.jpg"}, q]}, {}) == "missing_media"
    assert _reason(bundle, {"content": [IMG, q]}, {"0.png": b"junk"}) == "undecodable_image"
    assert _reason(bundle, {"content": [{"type": "video", "video": "0.mp4"}]}, {"0.mp4": b"junk"}) == \
        "undecodable_video"
    assert _reason(bundle, {"content": [{"type": "image", "image": "0.pkl"}]}, {"0.pkl": b"x"}) == "pickle_member"
    assert _reason(bundle, {"messages": [_user(q), {"role": "assistant", "content": []}]}, {}) == "empty_assistant"
    assert _reason(bundle, {"messages": [_user(q), _assistant("  ")]}, {}) == "empty_assistant"
    assert _reason(bundle, {"content": [{"type": "audio", "audio": "0.wav"}]}, {}) == "unknown_content_type"
    # a literal pad token in the text would give the image more slots than features
    assert _reason(bundle, {"content": [IMG, {"type": "text", "text": "<|image_pad|>"}]}, {"0.png": _png()}) == \
        "token_count_mismatch"


def test_encoder_without_family_refuses_boxes_and_videos(bundle):
    enc = Encoder(bundle.tokenizer, bundle.image_processor)
    rec = {"content": [IMG, {"type": "box", "box": [0, 0, 5, 5]}]}
    with pytest.raises(ValueError, match="build_encoder"):
        enc.encode(_raw(rec, {"0.png": _png()}))


def test_shapes_samples_are_deterministic():
    cfg = shapes.ShapesConfig()
    (r1, m1), (r2, m2) = shapes.sample(cfg, 17), shapes.sample(cfg, 17)
    assert r1 == r2 and m1["0.png"].tobytes() == m2["0.png"].tobytes()
    assert shapes.sample(cfg, 18)[0] != r1
