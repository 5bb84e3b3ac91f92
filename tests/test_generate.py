"""`python -m training.generate`: the greedy completion of an exported model equals HF's own `generate()` on the
same prompt, for an image and a text-only prompt of two families; a video prompt runs (with the stage's encoder
settings); a missing or broken image is an error naming the file.

The reference prompt is built without the project's encoder where that is possible: the chat template of the
exported tokenizer, HF's image processor loaded from the export (image sizes are multiples of the family's
patch factor, so no resize backend is involved) and the placeholder expansion HF's processor does. Decoding is
`model.generate()` of a model loaded by `from_pretrained`, not the project's code."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from data.encode import EncoderConfig
from data.video import write_mp4
from training import generate, models

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
NEW = 6
SIZE = {"qwen2_5_vl": (112, 84), "qwen3_vl": (128, 96)}  # (w, h): 4x3 merged 2x2 patch blocks, no resize
QUESTION = "What colour is the square?"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-1 decoding of a tiny model: more threads only contend (several times slower on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{family: stage dir}, each with its hf/ export written as the trainer writes it (models.export_hf) and a
    config.yaml whose data.encoder caps videos at 4 frames."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for fam in FAMILIES:
        bundle = models.build(models.ModelConfig(name=f"tiny_{fam}", family=fam, init_seed=3))
        stage = root / fam
        models.export_hf(bundle, bundle.model.state_dict(), stage / "hf")
        (stage / "config.yaml").write_text(yaml.safe_dump(
            {"model": {"family": fam, "name": f"tiny_{fam}"}, "data": {"encoder": {"video_max_frames": 4}}}))
        w, h = SIZE[fam]
        y, x = np.mgrid[0:h, 0:w]
        img = np.dstack([x * 2 % 256, y * 3 % 256, (x + y) % 256]).astype(np.uint8)
        Image.fromarray(img).save(root / f"{fam}.png")
        out[fam] = stage
    frames = np.stack([np.dstack([np.full((48, 64), (9 * t) % 256), np.full((48, 64), 80),
                                  np.full((48, 64), 200 - 5 * t)]) for t in range(40)]).astype(np.uint8)
    (root / "clip.mp4").write_bytes(write_mp4(frames, 10))  # 4 s at 10 fps: 8 frames at the default 2 fps
    return out


def run_cli(capsys, *args) -> dict:
    assert generate.main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def hf_reference(hf: Path, fam: str, question: str, image: Path | None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy completion ids) by plain transformers: template, HF image processor, HF generate."""
    tok = AutoTokenizer.from_pretrained(hf)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    inputs = {}
    if image:
        ip = Qwen2VLImageProcessorPil.from_pretrained(hf)
        px = ip(images=[Image.open(image)], return_tensors="pt")
        inputs.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        n = int(px["image_grid_thw"].prod()) // ip.merge_size ** 2
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad).long())
    model = models.FAMILIES[fam].model_cls.from_pretrained(hf).eval()
    stops = generate.stop_ids(tok)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, eos_token_id=stops,
                         pad_token_id=tok.pad_token_id, suppress_tokens=generate.banned_ids(tok))
    new = out[0, ids.shape[1]:].tolist()
    return ids[0].tolist(), new[:next((i for i, t in enumerate(new) if t in stops), len(new))]


@pytest.mark.parametrize("fam", FAMILIES)
def test_greedy_completion_equals_hf_generate(exports, fam, capsys):
    stage, image = exports[fam], exports[fam].parent / f"{fam}.png"
    hf = stage / "hf"
    for path, img in ((stage, image), (hf, None)):  # a stage dir and an hf/ dir; an image and a text-only prompt
        got = run_cli(capsys, path, *(["--image", img] if img else []), "--prompt", QUESTION,
                      "--max-new-tokens", NEW)
        ids, want = hf_reference(hf, fam, QUESTION, img)
        assert got["family"] == fam and got["prompt_tokens"] == len(ids)
        assert got["completion_ids"] == want and len(want) > 0, (img, got, want)
        tok = AutoTokenizer.from_pretrained(hf)
        assert got["completion"] == tok.decode(want, skip_special_tokens=True)
        assert got["completion_tokens"] == len(want) and got["tokens_per_s"] > 0
    # the CLI's prompt is the project's encoder's sample: the same ids as the plain-transformers prompt
    bundle = generate.load(generate.resolve(hf))
    sample = generate.encode(bundle, generate.Request(QUESTION, images=[str(image)]))
    assert sample["input_ids"].tolist() == hf_reference(hf, fam, QUESTION, image)[0]


def test_sampling_is_seeded(exports, capsys):
    hf = exports["qwen3_vl"] / "hf"
    args = (hf, "--prompt", QUESTION, "--max-new-tokens", NEW, "--temperature", 1.5, "--top-p", 0.95)
    a, b = run_cli(capsys, *args, "--seed", 1), run_cli(capsys, *args, "--seed", 1)
    assert a["completion_ids"] == b["completion_ids"]
    others = [run_cli(capsys, *args, "--seed", s)["completion_ids"] for s in (2, 3)]
    assert any(o != a["completion_ids"] for o in others)


@pytest.mark.parametrize("fam", FAMILIES)
def test_video_prompt_runs_with_the_stages_encoder_settings(exports, fam, capsys):
    stage = exports[fam]
    clip = stage.parent / "clip.mp4"
    args = ("--video", clip, "--prompt", "What happens?", "--max-new-tokens", NEW)
    capped = run_cli(capsys, stage, *args)  # config.yaml: data.encoder.video_max_frames=4
    full = run_cli(capsys, stage / "hf", *args)  # the hf/ dir's parent is the stage: the same settings
    bare_hf = stage.parent / f"{fam}_copy"
    bare_hf.symlink_to(stage / "hf")  # an hf dir outside any stage: the encoder defaults (8 frames here)
    default = run_cli(capsys, bare_hf, *args)
    flag = run_cli(capsys, bare_hf, *args, "--video-max-frames", 4)
    assert capped["prompt_tokens"] == full["prompt_tokens"] == flag["prompt_tokens"] < default["prompt_tokens"]
    assert capped["completion_ids"] == flag["completion_ids"] and capped["completion_tokens"] > 0
    # the decode equals HF generate on the encoder's video inputs
    bundle = generate.load(generate.resolve(bare_hf))
    s = generate.encode(bundle, generate.Request("What happens?", videos=[str(clip)]),
                        EncoderConfig(video_max_frames=4))
    assert len(s["input_ids"]) == capped["prompt_tokens"] and "pixel_values_videos" in s
    inputs = {k: v[None] if k in ("input_ids", "mm_token_type_ids") else v for k, v in s.items()
              if k in ("input_ids", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                       "second_per_grid_ts")}
    model = models.FAMILIES[fam].model_cls.from_pretrained(bare_hf).eval()
    tok = bundle.tokenizer
    out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), do_sample=False,
                         max_new_tokens=NEW, eos_token_id=generate.stop_ids(tok), pad_token_id=tok.pad_token_id,
                         suppress_tokens=generate.banned_ids(tok))
    new = out[0, len(s["input_ids"]):].tolist()
    cut = next((i for i, t in enumerate(new) if t in generate.stop_ids(tok)), len(new))
    assert capped["completion_ids"] == new[:cut]


def test_a_stage_without_export_loads_its_training_checkpoint(exports, capsys, tmp_path):
    """A stage stopped before its hf/ export: its latest checkpoint (DeepSpeed ZeRO-1/2 layout) and the model
    section of its config.yaml, as training/models.py loads them for the next stage."""
    cfg = models.ModelConfig(name="tiny_qwen3_vl", family="qwen3_vl", init_seed=3)
    step = tmp_path / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    torch.save({"module": models.build(cfg).model.state_dict()}, step / "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    args = ("--prompt", QUESTION, "--max-new-tokens", NEW)
    got = run_cli(capsys, tmp_path, *args)
    assert generate.resolve(tmp_path).what.startswith(f"training checkpoint {step}")
    assert got["completion_ids"] == run_cli(capsys, exports["qwen3_vl"] / "hf", *args)["completion_ids"]


def test_missing_or_broken_image_is_an_error_naming_the_file(exports, capsys, tmp_path):
    hf = exports["qwen3_vl"] / "hf"
    missing = tmp_path / "no_such_photo.png"
    assert generate.main([str(hf), "--image", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--image {missing}: no such file" in err and "Traceback" not in err
    broken = tmp_path / "truncated.png"
    broken.write_bytes((exports["qwen3_vl"].parent / "qwen3_vl.png").read_bytes()[:60])
    assert generate.main([str(hf), "--image", str(broken), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "undecodable_image" in err
    assert generate.main([str(tmp_path), "--prompt", "hi"]) == 2
    assert "holds no model" in capsys.readouterr().err
