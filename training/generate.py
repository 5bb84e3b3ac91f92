"""Try a model on images, videos and text: `python -m training.generate PATH --image x.png --prompt "..."`.

PATH is a stage's output directory (its `hf/` export, or, for a stage stopped before it exported, its latest
training checkpoint), an `hf/` export, or any local Qwen-VL checkpoint in HF format. The family comes from the
export's config.json (a checkpoint's: its run's config.yaml).

The prompt tensors are built by the project's own encoder (data/encode.py), exactly as training builds them: the
family's chat template, images through data/vision.py and videos through data/video.py, the placeholder tokens
expanded to the merged-patch counts. So no `AutoProcessor` is needed, and with it no torchvision (which HF's video
processors import). When PATH is a stage's directory (or its `hf/`), the encoder takes that stage's `data.encoder`
settings from its config.yaml (video fps, frame and pixel budgets); image budgets come from the export's
preprocessor_config.json, as in training.

Decoding is the SAPO rollouts' (stages/rollout.py `generate`): HF `generate` with its KV cache, the vision
encoder run once on the prompt's media, the vision placeholder tokens never generated, stopped at <|im_end|> or
the end-of-text token. `--temperature 0` (the default) is greedy; above 0 it samples (`--top-p`, `--seed`).

    python -m training.generate runs/sft --image cat.png --prompt "What is in the picture?"
    python -m training.generate runs/sft/hf --video clip.mp4 --prompt "Describe the clip." --json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data.encode import EncoderConfig, build_encoder
from data.errors import BadSample
from data.vision import IMAGE_EXTS
from training import models

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class GenerateError(ValueError):
    """A usage error (a missing file, a directory that holds no model): printed without a traceback."""


@dataclass
class Source:
    """Where a model comes from: the ModelConfig that builds it and the run directory whose config.yaml (if any)
    holds the encoder settings it was trained with."""

    model: models.ModelConfig
    run_dir: Optional[Path]
    what: str  # for the log line: "hf export DIR" or "training checkpoint DIR"


@dataclass
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Request:
    prompt: str
    images: list = field(default_factory=list)  # paths
    videos: list = field(default_factory=list)  # paths: an mp4 (any container PyAV reads) or a directory of frames
    system: Optional[str] = None


def family_of(hf_dir: Path) -> str:
    """The family of an HF directory, from its config.json's model_type."""
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    for name, fam in models.FAMILIES.items():
        if fam.model_type == model_type:
            return name
    raise GenerateError(f"{hf_dir}/config.json has model_type={model_type!r}, which is not a Qwen-VL family "
                        f"({', '.join(f.model_type for f in models.FAMILIES.values())})")


def resolve(path, dtype: str = "float32", attn_implementation: str = "sdpa") -> Source:
    """PATH (stage output dir, hf/ export, HF checkpoint, training checkpoint) -> how to build its model."""
    p = Path(path)
    if not p.exists():
        raise GenerateError(f"model path {str(p)!r} does not exist")
    kw = dict(dtype=dtype, attn_implementation=attn_implementation)
    for hf, run_dir in ((p / "hf", p), (p, p.parent if p.name == "hf" else None)):
        if (hf / "config.json").is_file():
            run_dir = run_dir if run_dir is not None and (run_dir / "config.yaml").is_file() else None
            return Source(models.ModelConfig(name="generate", family=family_of(hf), path=str(hf), **kw), run_dir,
                          f"hf export {hf}")
    step_dir = models._training_checkpoint(p)
    if step_dir is not None:
        run_dir = step_dir.parent.parent
        conf = _run_config(run_dir)
        if conf is None:
            raise GenerateError(f"{p} holds the training checkpoint {step_dir} but {run_dir}/config.yaml, which "
                                f"names its model, is missing; point PATH at the stage's hf/ export")
        return Source(models.ModelConfig(name="generate", family=conf["model"]["family"], path=str(p), **kw),
                      run_dir, f"training checkpoint {step_dir}" +
                      ("" if (run_dir / "hf" / "config.json").is_file() else f" (no hf/ export in {run_dir})"))
    raise GenerateError(f"{str(p)!r} holds no model: expected a stage's output directory (with hf/ or "
                        f"checkpoints/), an hf/ export or an HF checkpoint directory (with config.json)")


def _run_config(run_dir: Optional[Path]) -> Optional[dict]:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def encoder_config(run_dir: Optional[Path], **overrides) -> tuple[EncoderConfig, Optional[int]]:
    """(the encoder settings of the stage that trained the model (its config.yaml's data.encoder) or the defaults,
    with `overrides` that are not None; that stage's data.max_video_frames or None)."""
    conf = _run_config(run_dir) or {}
    data = conf.get("data") or {}
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    enc = {k: v for k, v in (data.get("encoder") or {}).items() if k in names}
    enc.update({k: v for k, v in overrides.items() if v is not None})
    return EncoderConfig(**enc), data.get("max_video_frames")


def load(source: Source, device: str = "cpu") -> models.Bundle:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bundle = models.build(source.model)
    bundle.model.to(device).eval()
    return bundle


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"--{what} {path}: no such file" if not p.exists() else f"--{what} {path}: not a file")
    return p.read_bytes()


def _video(path: str) -> tuple[object, object]:
    """(member name(s), media) of a video: an mp4's bytes, or a directory's image files in name order (frames)."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if not frames:
            raise GenerateError(f"--video {path}: a directory of frames, but it holds no image files "
                                f"({', '.join(sorted(IMAGE_EXTS))})")
        return [str(f) for f in frames], {str(f): f.read_bytes() for f in frames}
    return path, {path: _read(path, "video")}


def record(req: Request, video_fps: Optional[float] = None) -> tuple[dict, dict]:
    """(record, media) of a request: one user turn with the images, then the videos, then the text, as an RL
    prompt record (data/README.md), which the encoder ends with the assistant header (the generation prompt).
    Media members are named by their paths, so the encoder's errors name the user's files."""
    media: dict = {}
    parts = []
    for path in req.images:
        media[path] = _read(path, "image")
        parts.append({"type": "image", "image": path})
    for path in req.videos:
        name, data = _video(path)
        media.update(data)
        part = {"type": "video", "video": name}
        if isinstance(name, list) and video_fps is not None:
            part["fps"] = video_fps
        parts.append(part)
    parts.append({"type": "text", "text": req.prompt})
    messages = ([{"role": "system", "content": req.system}] if req.system is not None else []) + \
        [{"role": "user", "content": parts}]
    return {"messages": messages, "answer": None}, media


def encode(bundle: models.Bundle, req: Request, cfg: EncoderConfig = EncoderConfig(),
           max_video_frames: Optional[int] = None) -> dict:
    """The prompt sample of `req` as training encodes it (input_ids ending in the assistant header,
    mm_token_type_ids, pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw, second_per_grid_ts)."""
    return encode_record(bundle, *record(req), cfg, max_video_frames)


def encode_record(bundle: models.Bundle, rec: dict, media: dict, cfg: EncoderConfig = EncoderConfig(),
                  max_video_frames: Optional[int] = None) -> dict:
    encoder = build_encoder(cfg, bundle, **({"max_video_frames": max_video_frames} if max_video_frames else {}))
    try:
        return encoder.encode({"key": "prompt", "source": "generate", "record": rec, "media": media})[0]
    except BadSample as e:
        raise GenerateError(f"cannot use the prompt: {e.reason}: {e.detail}") from None


def stop_ids(tok) -> list[int]:
    return sorted({t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None})


def banned_ids(tok) -> list[int]:
    return [t for t in (tok.convert_tokens_to_ids(s) for s in VISION_TOKENS) if t is not None]


def complete(bundle: models.Bundle, sample: dict, s: Settings = Settings()) -> dict:
    """The completion of an encoded prompt by the rollouts' decoding (stages/rollout.py): token ids (the stop
    token, if reached, cut off), text, counts and speed."""
    from stages import rollout

    tok = bundle.tokenizer
    stops = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompt = {k: v for k, v in sample.items() if isinstance(v, torch.Tensor)}
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    ids = rollout.generate(bundle.model, [prompt], 1, pad, stops, s.temperature, s.top_p, s.max_new_tokens,
                           synced=False, banned=banned_ids(tok))[0]
    seconds = time.perf_counter() - t0
    stopped = bool(ids) and ids[-1] in stops
    ids = ids[:-1] if stopped else ids
    return {"prompt_tokens": len(sample["input_ids"]), "completion": tok.decode(ids, skip_special_tokens=True),
            "completion_ids": ids, "completion_tokens": len(ids), "finish_reason": "stop" if stopped else "length",
            "seconds": round(seconds, 4), "tokens_per_s": round(len(ids) / seconds, 2) if seconds > 0 else None}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("    python"):])
    ap.add_argument("path", help="a stage's output dir, an hf/ export or an HF checkpoint dir")
    ap.add_argument("--prompt", required=True, help="the user's text (after the images and videos)")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeatable, in order)")
    ap.add_argument("--video", action="append", default=[],
                    help="a video file (mp4, ...) or a directory of frame images (repeatable)")
    ap.add_argument("--system", help="a system message (default: the chat template's own, if any)")
    ap.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=Settings.temperature, help="0: greedy; > 0: sampled")
    ap.add_argument("--top-p", type=float, default=Settings.top_p, help="nucleus sampling (with --temperature > 0)")
    ap.add_argument("--seed", type=int, default=Settings.seed, help="sampling seed")
    ap.add_argument("--video-fps", type=float, help="frames sampled per second of an mp4, and the fps of a frame "
                                                    "directory (default: the stage's data.encoder, else 2)")
    ap.add_argument("--video-max-frames", type=int, help="most frames sampled from a video (default: the stage's "
                                                         "data.encoder, else 16)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is fastest for the tiny models)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--attn-implementation", default="sdpa", help="sdpa | flash_attention_2 | eager")
    ap.add_argument("--json", action="store_true", help="print one JSON object (prompt tokens, completion, "
                                                        "tokens/s, ...) instead of the text")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1 or a.temperature < 0 or not 0 < a.top_p <= 1:
        ap.error("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    device = a.device or default_device()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        req = Request(prompt=a.prompt, images=a.image, videos=a.video, system=a.system)
        rec, media = record(req, a.video_fps)  # every file is read before the model loads
        source = resolve(a.path, dtype=dtype, attn_implementation=a.attn_implementation)
        enc_cfg, max_frames = encoder_config(source.run_dir, video_fps=a.video_fps, frame_list_fps=a.video_fps,
                                             video_max_frames=a.video_max_frames)
        print(f"loading {source.what} on {device} ({dtype})", file=sys.stderr)
        bundle = load(source, device)
        sample = encode_record(bundle, rec, media, enc_cfg, max_frames)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = complete(bundle, sample, Settings(a.max_new_tokens, a.temperature, a.top_p, a.seed))
    if a.json:
        print(json.dumps({"path": str(a.path), "family": source.model.family, **out}))
    else:
        print(out["completion"])
        print(f"[{out['prompt_tokens']} prompt tokens, {out['completion_tokens']} new ({out['finish_reason']}), "
              f"{out['tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
