"""RawSample -> Encoded samples (data/README.md): tokens, labels, pixels, grids, per family.

Chat records go through the family's chat template and supervise assistant turns only (content + <|im_end|>);
role-less documents supervise every text token. Image/video pads are expanded to the merged-patch count here,
as the HF processor would, so the model sees one embedding slot per merged patch. Preference records give two
samples (chosen, rejected) sharing a group; RL records give one unsupervised prompt sample.
A sample that cannot be used raises `data.errors.BadSample` with a fixed reason slug.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from data.errors import BadSample
from data.video import VideoConfig, VideoProcessor
from data.vision import ImageProcessor, VisionConfig, decode_image, smart_resize

IGNORE = -100
CONTENT_TYPES = ("text", "image", "video", "box")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class EncoderConfig:
    """Vision budgets of the encoder. Image min/max pixels left None come from the model's image processor (so
    training and the exported processor agree). Video defaults follow qwen-vl-utils' rules with budgets small
    enough for the tiny CPU models; None takes qwen-vl-utils' own value (128 / 768 tokens per frame,
    0.9 x 128000 tokens per video)."""

    image_min_pixels: Optional[int] = None
    image_max_pixels: Optional[int] = None
    # torch | pil: which HF image-processor backend to equal bitwise (data/vision.py VisionConfig.resize): "torch"
    # = HF's default with torchvision installed, ~2x faster here; "pil" = HF without torchvision and qwen-vl-utils.
    resize: str = "torch"
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 16
    video_nframes: Optional[int] = None
    video_min_pixels: Optional[int] = 56 * 56
    video_max_pixels: Optional[int] = 128 * 128
    video_total_pixels: Optional[int] = 16 * 128 * 128
    frame_list_fps: float = 2.0

    def video(self) -> VideoConfig:
        return VideoConfig(fps=self.video_fps, min_frames=self.video_min_frames, max_frames=self.video_max_frames,
                           nframes=self.video_nframes, min_pixels=self.video_min_pixels,
                           max_pixels=self.video_max_pixels, total_pixels=self.video_total_pixels,
                           frame_list_fps=self.frame_list_fps)


def build_encoder(cfg: EncoderConfig, bundle) -> "Encoder":
    """The encoder of a `training.models.Bundle` (family, tokenizer, image processor)."""
    return Encoder(bundle.tokenizer, bundle.image_processor, family=bundle.family.name, cfg=cfg)


def group_id(source: str, key: str) -> int:
    """A stable 63-bit id per raw sample: the samples one record encodes to share it."""
    return int.from_bytes(hashlib.blake2b(f"{source}\0{key}".encode(), digest_size=8).digest(), "big") >> 1


def _clamp(v: float, hi: int) -> int:
    return max(0, min(hi, int(round(v))))


class Encoder:
    """`encode(raw) -> list[Encoded]`. Build it with `build_encoder`; `family=None` (the old two-argument form)
    handles text and images, which are the same for every family, and refuses boxes and videos."""

    def __init__(self, tokenizer, image_processor, family: Optional[str] = None,
                 cfg: Optional[EncoderConfig] = None):
        if family is not None and family not in FAMILIES:
            raise ValueError(f"family={family!r} is unknown; choose one of {FAMILIES}")
        self.tok, self.family, self.cfg = tokenizer, family, cfg or EncoderConfig()
        self.vision = VisionConfig.from_hf(image_processor, self.cfg.image_min_pixels, self.cfg.image_max_pixels,
                                           self.cfg.resize)
        self.images = ImageProcessor(self.vision)
        self.videos = VideoProcessor(self.vision, self.cfg.video())
        self.merge2 = self.vision.merge_size ** 2
        ids = tokenizer.convert_tokens_to_ids
        self.image_pad, self.video_pad = ids("<|image_pad|>"), ids("<|video_pad|>")
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.header = [self.im_start] + tokenizer.encode("assistant", add_special_tokens=False) + \
            tokenizer.encode("\n", add_special_tokens=False)

    # ------------------------------------------------------------ records -> samples

    def encode(self, raw: dict) -> list[dict]:
        record, key, source = raw["record"], str(raw.get("key", "?")), raw.get("source") or \
            raw["record"].get("source", "default")
        base = dict(key=key, source=source, group=group_id(source, key), raw=raw, kind=None)
        if "chosen" in record or "rejected" in record:
            prompt = self._messages(record, key)
            out = []
            for kind in ("chosen", "rejected"):
                reply = self._reply(record, kind, key)
                out.append(self._chat(prompt + reply, raw, key, base, kind=kind, last_only=True))
            return out
        if "answer" in record or "reward" in record:
            s = self._chat(self._messages(record, key), raw, key, base, kind="prompt", generation_prompt=True)
            s.update(answer=record.get("answer"), reward=record.get("reward"))
            return [s]
        if "messages" in record:
            return [self._chat(self._messages(record, key), raw, key, base)]
        if "content" in record:
            return [self._document(record["content"], raw, key, base)]
        raise ValueError(f"sample {key!r} of source {source!r}: the record has none of 'messages', 'content', "
                         f"'chosen'/'rejected', 'answer'/'reward' (keys: {sorted(record)}); see DESIGN.md record format")

    def _messages(self, record: dict, key: str) -> list[dict]:
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadSample("bad_record", key, "'messages' must be a non-empty list")
        return list(msgs)

    def _reply(self, record: dict, kind: str, key: str) -> list[dict]:
        r = record.get(kind)
        if r is None:
            raise BadSample("bad_record", key, f"preference record without {kind!r}")
        if isinstance(r, str):
            r = {"role": "assistant", "content": [{"type": "text", "text": r}]}
        reply = r if isinstance(r, list) else [r]
        if not reply or reply[-1].get("role") != "assistant":
            raise BadSample("bad_record", key, f"{kind!r} must end with an assistant message")
        return reply

    def _chat(self, messages: list[dict], raw: dict, key: str, base: dict, kind=None, last_only=False,
              generation_prompt=False) -> dict:
        parts = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadSample("bad_record", key, f"message {m!r:.80} needs 'role' and 'content'")
            if m["role"] == "assistant" and not self._has_text(m["content"]):
                raise BadSample("empty_assistant", key)
            if not isinstance(m["content"], str):
                parts += m["content"]
        media = self._media(parts, raw, key)
        rendered = [m if isinstance(m["content"], str) else
                    dict(m, content=[self._render(p, media, key) for p in m["content"]]) for m in messages]
        text = self.tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=generation_prompt)
        ids, out = self._tokenize(text, media, key)
        labels = torch.full_like(ids, IGNORE)
        if not generation_prompt:
            spans = self._assistant_spans(ids.tolist())
            for s, e in spans[-1:] if last_only else spans:
                labels[s:e] = ids[s:e]
        return dict(base, **out, input_ids=ids, labels=labels, kind=kind)

    def _document(self, parts, raw: dict, key: str, base: dict) -> dict:
        if not isinstance(parts, list):
            raise BadSample("bad_record", key, "'content' of a document must be a list of parts")
        media = self._media(parts, raw, key)
        vis = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
               "video": "<|vision_start|><|video_pad|><|vision_end|>"}
        text = "".join(vis.get(p["type"]) or self._render(p, media, key)["text"] for p in parts) + "<|endoftext|>"
        ids, out = self._tokenize(text, media, key)
        labels = ids.clone()
        labels[(ids == self.image_pad) | (ids == self.video_pad)] = IGNORE
        return dict(base, **out, input_ids=ids, labels=labels)

    @staticmethod
    def _has_text(content) -> bool:
        if isinstance(content, str):
            return bool(content.strip())
        return any((p.get("type") == "text" and str(p.get("text", "")).strip()) or p.get("type") == "box"
                   for p in content)

    # ------------------------------------------------------------ media

    def _media(self, parts: list, raw: dict, key: str) -> dict:
        """Decode and process every image/video part in order: {"images": [...], "videos": [...], "sizes": {}}."""
        store = raw.get("media") or {}
        images, videos, sizes = [], [], {}
        for p in parts:
            t = p.get("type") if isinstance(p, dict) else None
            if t not in CONTENT_TYPES:
                raise BadSample("unknown_content_type", key, f"part type {t!r}; known: {CONTENT_TYPES}")
            if t == "image":
                name = p.get("image")
                if name not in store:
                    raise BadSample("missing_media", key, f"image {name!r} not among {sorted(store)}")
                img = decode_image(store[name], name, key)
                try:
                    images.append(self.images.one(img))
                except ValueError as e:  # smart_resize: aspect ratio over 200
                    raise BadSample("extreme_aspect_ratio", key, f"{name!r}: {e}") from None
                sizes[name] = img.size
            elif t == "video":
                if self.family is None:
                    raise ValueError("this Encoder was built without a family and cannot encode videos; "
                                     "build it with data.encode.build_encoder(cfg, bundle)")
                name = p.get("video")
                names = name if isinstance(name, list) else [name]
                missing = [n for n in names if n not in store]
                if missing:
                    raise BadSample("missing_media", key, f"video {missing} not among {sorted(store)}")
                data = [store[n] for n in name] if isinstance(name, list) else store[name]
                videos.append(self.videos(data, str(name), key, fps=p.get("fps")))
        return {"images": images, "videos": videos, "sizes": sizes, "order": [p for p in parts
                                                                           if p.get("type") == "image"]}

    def _render(self, part: dict, media: dict, key: str) -> dict:
        """A content part as the chat template sees it: boxes become text in the family's format."""
        if part.get("type") != "box":
            return part
        return {"type": "text", "text": self.box_text(part, media, key)}

    def box_text(self, part: dict, media: dict, key: str) -> str:
        """Qwen2-VL: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` on 0-1000;
        Qwen2.5-VL: `{"bbox_2d": [...], "label": ...}` in pixels of the resized image; Qwen3-VL: same JSON on 0-1000.
        The box refers to the image it names (`"image"`) or else the first image of the sample."""
        if self.family is None:
            raise ValueError("this Encoder was built without a family and cannot render boxes; "
                             "build it with data.encode.build_encoder(cfg, bundle)")
        name = part.get("image") or next((p["image"] for p in media["order"]), None)
        if name not in media["sizes"]:
            raise BadSample("box_without_image", key, f"box {part.get('box')} refers to no image of the sample")
        W, H = media["sizes"][name]
        try:
            x1, y1, x2, y2 = (float(v) for v in part["box"])
        except (KeyError, TypeError, ValueError):
            raise BadSample("bad_record", key, f"box part needs 'box': [x1, y1, x2, y2], got {part!r:.80}") from None
        label = part.get("label")
        if self.family == "qwen2_5_vl":
            v = self.vision
            rh, rw = smart_resize(H, W, v.factor, v.min_pixels, v.max_pixels)
            coords = [_clamp(x1 * rw / W, rw - 1), _clamp(y1 * rh / H, rh - 1),
                      _clamp(x2 * rw / W, rw - 1), _clamp(y2 * rh / H, rh - 1)]
        else:
            coords = [_clamp(x1 / W * 1000, 1000), _clamp(y1 / H * 1000, 1000),
                      _clamp(x2 / W * 1000, 1000), _clamp(y2 / H * 1000, 1000)]
        if self.family == "qwen2_vl":
            ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label else ""
            return f"{ref}<|box_start|>({coords[0]},{coords[1]}),({coords[2]},{coords[3]})<|box_end|>"
        obj = {"bbox_2d": coords}
        if label is not None:
            obj["label"] = label
        return json.dumps(obj, ensure_ascii=False)

    # ------------------------------------------------------------ text -> tokens

    def _tokenize(self, text: str, media: dict, key: str) -> tuple[torch.Tensor, dict]:
        """Expand vision placeholders, tokenize, and check pad tokens against the features."""
        images, videos = media["images"], media["videos"]
        out: dict = {}
        n_img = [grid[0] * grid[1] * grid[2] // self.merge2 for _, grid in images]
        n_vid = [v.grid_thw[0] * v.grid_thw[1] * v.grid_thw[2] // self.merge2 for v in videos]
        text = self._expand(text, "<|image_pad|>", ["<|image_pad|>" * n for n in n_img], key)
        if self.family == "qwen3_vl":
            # one "<t seconds><|vision_start|>pads<|vision_end|>" block per temporal patch, replacing the
            # template's "<|vision_start|><|video_pad|><|vision_end|>" (Qwen3VLProcessor's layout)
            blocks = ["".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (n // v.grid_thw[0]) +
                              "<|vision_end|>" for t in v.timestamps) for v, n in zip(videos, n_vid)]
            text = self._expand(text, "<|vision_start|><|video_pad|><|vision_end|>", blocks, key)
        else:
            text = self._expand(text, "<|video_pad|>", ["<|video_pad|>" * n for n in n_vid], key)
        ids = torch.tensor(self.tok.encode(text, add_special_tokens=False), dtype=torch.long)
        for name, tok, want in (("image", self.image_pad, sum(n_img)), ("video", self.video_pad, sum(n_vid))):
            got = int((ids == tok).sum())
            if got != want:
                raise BadSample("token_count_mismatch", key, f"{got} {name} pad tokens for {want} {name} features")
        out["mm_token_type_ids"] = (ids == self.image_pad).long() + 2 * (ids == self.video_pad).long()
        if images:
            out["pixel_values"] = torch.cat([r for r, _ in images])
            out["image_grid_thw"] = torch.tensor([g for _, g in images], dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
            out["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos], dtype=torch.long)
            if self.family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos], dtype=torch.float)
        return ids, out

    @staticmethod
    def _expand(text: str, placeholder: str, replacements: list[str], key: str) -> str:
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(replacements):
            raise BadSample("token_count_mismatch", key, f"{len(pieces) - 1} {placeholder!r} slots in the text for "
                                                         f"{len(replacements)} media")
        return pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:]))

    def _assistant_spans(self, seq: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each assistant turn's content and its <|im_end|>, not the role header."""
        spans, h, i = [], self.header, 0
        while i < len(seq):
            if seq[i:i + len(h)] == h:
                start = end = i + len(h)
                while end < len(seq) and seq[end] != self.im_end:
                    end += 1
                end = min(end + 1, len(seq))  # include <|im_end|>
                spans.append((start, end))
                i = end
            else:
                i += 1
        return spans
