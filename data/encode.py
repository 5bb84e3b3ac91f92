"""RawSample -> Encoded samples (data/README.md): tokens, labels, pixels, grids, per family.

Chat records go through the family's chat template and supervise assistant turns only (content + <|im_end|>);
role-less documents supervise every text token. Image/video pads are expanded to the merged-patch count here,
as the HF processor would, so the model sees one embedding slot per merged patch. Preference records give two
samples (chosen, rejected) sharing a group; RL records give one unsupervised prompt sample.
A sample that cannot be used raises `data.errors.BadSample` with a fixed reason slug: records come from shards
and are untrusted, so every field is type-checked before use (a crafted record must cost one counted sample,
never the run), and what still slips past the checks is caught as "malformed_record".
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch

from data import teacher
from data.errors import BadSample
from data.video import MAX_VIDEO_FRAMES, VideoConfig, VideoProcessor
from data.vision import ImageProcessor, VisionConfig, decode_image, refuse_pickle, smart_resize

IGNORE = -100
CONTENT_TYPES = ("text", "image", "video", "box")
# family -> the text layout it shares (boxes, video blocks, Qwen2.5-VL's seconds per grid): the MoE model is
# Qwen3-VL's processor and chat template on another decoder
LAYOUT = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
FAMILIES = tuple(LAYOUT)
ROLES = ("system", "user", "assistant")  # as data.convert checks; the templates differ on others
LLAVA_PLACEHOLDERS = ("<image>", "<video>")
# what a crafted record can still raise past the explicit checks: counted as "malformed_record", not a crash
RECORD_ERRORS = (KeyError, TypeError, AttributeError, IndexError, ValueError, OverflowError, ZeroDivisionError,
                 RecursionError)


class NoFamily(ValueError):
    """A set-up error (an Encoder built without a family met a video or box), so never counted as bad data."""


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


def build_encoder(cfg: EncoderConfig, bundle, max_video_frames: int = MAX_VIDEO_FRAMES) -> "Encoder":
    """The encoder of a `training.models.Bundle` (family, tokenizer, image processor); `max_video_frames` is
    data.max_video_frames."""
    return Encoder(bundle.tokenizer, bundle.image_processor, family=bundle.family.name, cfg=cfg,
                   max_video_frames=max_video_frames)


def group_id(source: str, key: str) -> int:
    """A stable 63-bit id per raw sample: the samples one record encodes to share it."""
    return int.from_bytes(hashlib.blake2b(f"{source}\0{key}".encode(), digest_size=8).digest(), "big") >> 1


def _clamp(v: float, hi: int) -> int:
    return max(0, min(hi, int(round(v))))


def _number(v) -> bool:
    """A finite JSON number (json.loads accepts NaN and Infinity; a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shape(record) -> Optional[str]:
    """Which record shape (data/RECORDS.md) this is, None for none of them."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "answer" in record or "reward" in record:
        return "rl"
    return "chat" if "messages" in record else "document" if "content" in record else None


def _names(part: dict) -> list:
    """The member names an image or video part refers to."""
    v = part[part["type"]]
    return [v] if isinstance(v, str) else v


class Encoder:
    """`encode(raw) -> list[Encoded]`. Build it with `build_encoder`; `family=None` (the old two-argument form)
    handles text and images, which are the same for every family, and refuses boxes and videos."""

    def __init__(self, tokenizer, image_processor, family: Optional[str] = None,
                 cfg: Optional[EncoderConfig] = None, max_video_frames: int = MAX_VIDEO_FRAMES):
        if family is not None and family not in FAMILIES:
            raise ValueError(f"family={family!r} is unknown; choose one of {FAMILIES}")
        self.tok, self.family, self.cfg = tokenizer, family, cfg or EncoderConfig()
        self.layout = LAYOUT.get(family)  # what the branches below test: the family's layout
        self.vision = VisionConfig.from_hf(image_processor, self.cfg.image_min_pixels, self.cfg.image_max_pixels,
                                           self.cfg.resize)
        self.images = ImageProcessor(self.vision)
        self.videos = VideoProcessor(self.vision, replace(self.cfg.video(), max_source_frames=max_video_frames))
        self.merge2 = self.vision.merge_size ** 2
        ids = tokenizer.convert_tokens_to_ids
        self.image_pad, self.video_pad = ids("<|image_pad|>"), ids("<|video_pad|>")
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.header = [self.im_start] + tokenizer.encode("assistant", add_special_tokens=False) + \
            tokenizer.encode("\n", add_special_tokens=False)

    # ------------------------------------------------------------ records -> samples

    def encode(self, raw: dict) -> list[dict]:
        key = str(raw.get("key", "?"))
        try:
            samples = self._encode(raw, key)
            stored = (raw.get("media") or {}).get(teacher.MEMBER)
            if stored is not None:  # a teacher's top-k log-probs (data/teacher.py), checked against this encoding
                if [s["kind"] for s in samples] != [None]:
                    raise BadSample("bad_teacher_outputs", key, f"member {teacher.MEMBER} belongs to chat or "
                                                                f"document records only; this is a {_shape(raw.get('record'))} record")
                teacher.attach(samples[0], stored, len(self.tok), IGNORE)
            return samples
        except NoFamily:
            raise
        except RECORD_ERRORS as e:  # past the explicit checks, still this record's fault: one counted sample
            raise BadSample("malformed_record", key, f"{type(e).__name__}: {e}; fix the record (see the record "
                                                     f"format in data/RECORDS.md)") from None

    def _encode(self, raw: dict, key: str) -> list[dict]:
        record = raw.get("record")
        shape = _shape(record)
        if shape is None:
            what = f"keys: {sorted(map(str, record))}" if isinstance(record, dict) else f"a {type(record).__name__}"
            raise BadSample("unknown_record_shape", key, f"the record has none of 'messages', 'content', 'chosen'/"
                                                         f"'rejected', 'answer'/'reward' ({what:.200}); see the "
                                                         f"record format in data/RECORDS.md")
        source = raw.get("source") or record.get("source", "default")
        base = dict(key=key, source=source, group=group_id(source, key), raw=raw, kind=None)
        if shape == "document":
            parts = self._parts(record["content"], key, "'content' of a document")
            self._check_media(parts, [p["text"] for p in parts if p["type"] == "text"], raw, key)
            return [self._document(parts, raw, key, base)]
        prompt = self._messages(record, key)
        replies = {k: self._reply(record, k, key) for k in ("chosen", "rejected")} if shape == "preference" else {}
        every = prompt + [m for r in replies.values() for m in r]
        parts = [p for m in every if isinstance(m["content"], list) for p in m["content"]]
        texts = [m["content"] for m in every if isinstance(m["content"], str)]
        self._check_media(parts, texts + [p["text"] for p in parts if p["type"] == "text"], raw, key)
        if shape == "preference":
            return [self._chat(prompt + replies[k], raw, key, base, kind=k, last_only=True) for k in replies]
        if shape == "rl":
            s = self._chat(prompt, raw, key, base, kind="prompt", generation_prompt=True)
            s.update(answer=record.get("answer"), reward=record.get("reward"))
            return [s]
        return [self._chat(prompt, raw, key, base)]

    # ------------------------------------------------------------ checks of the untrusted record

    def _messages(self, record: dict, key: str) -> list[dict]:
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadSample("bad_record", key, "'messages' must be a non-empty list")
        return [self._message(m, key, f"messages[{i}]") for i, m in enumerate(msgs)]

    def _reply(self, record: dict, kind: str, key: str) -> list[dict]:
        r = record.get(kind)
        if r is None:
            raise BadSample("bad_record", key, f"preference record without {kind!r}")
        if isinstance(r, str):
            r = {"role": "assistant", "content": [{"type": "text", "text": r}]}
        reply = [self._message(m, key, f"{kind}[{i}]") for i, m in enumerate(r if isinstance(r, list) else [r])]
        if not reply or reply[-1]["role"] != "assistant":
            raise BadSample("bad_record", key, f"{kind!r} must end with an assistant message")
        return reply

    def _message(self, m, key: str, where: str) -> dict:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES or \
                "content" not in m:
            raise BadSample("bad_record", key, f"{where} must be an object with a 'role' in {ROLES} and a "
                                               f"'content', got {m!r:.80}")
        if not isinstance(m["content"], str):
            self._parts(m["content"], key, f"{where} 'content'")
        return m

    def _parts(self, parts, key: str, where: str) -> list:
        if not isinstance(parts, list):
            raise BadSample("bad_record", key, f"{where} must be a string or a list of parts, got "
                                               f"{type(parts).__name__}")
        for i, p in enumerate(parts):
            self._part(p, key, f"{where}[{i}]")
        return parts

    def _part(self, p, key: str, where: str) -> None:
        """Types of one content part, so that nothing below meets a field it cannot use."""
        if not isinstance(p, dict):
            raise BadSample("bad_record", key, f"{where} must be an object like {{'type': 'text', 'text': ...}}, "
                                               f"got {p!r:.60}")
        t = p.get("type")
        if not isinstance(t, str) or t not in CONTENT_TYPES:
            raise BadSample("unknown_content_type", key, f"{where}: part type {t!r:.40}; known: {CONTENT_TYPES}")
        if t in ("video", "box") and self.family is None:
            raise NoFamily(f"this Encoder was built without a family and cannot encode {t}s; "
                           "build it with data.encode.build_encoder(cfg, bundle)")
        v = p.get(t)
        problem = None
        if t == "text" and not isinstance(v, str):
            problem = "'text' must be a string"
        elif t == "image" and not isinstance(v, str):
            problem = "'image' must be a member name (a string)"
        elif t == "video" and not (isinstance(v, str) or isinstance(v, list) and v and
                                   all(isinstance(n, str) for n in v)):
            problem = "'video' must be a member name or a non-empty list of frame member names"
        elif t == "video" and p.get("fps") is not None and not (_number(p["fps"]) and p["fps"] > 0):
            problem = "'fps' must be a number > 0"
        elif t == "box" and not (isinstance(v, list) and len(v) == 4 and all(_number(x) for x in v)):
            problem = "'box' must be [x1, y1, x2, y2], four finite numbers"
        elif t == "box" and not isinstance(p.get("label", ""), (str, type(None))):
            problem = "'label' must be a string"
        elif t == "box" and not isinstance(p.get("image", ""), (str, type(None))):
            problem = "'image' must be a member name (a string)"
        if problem:
            raise BadSample("bad_record", key, f"{where} ({t} part): {problem}, got {p!r:.80}")

    @staticmethod
    def _check_media(parts: list, texts: list, raw: dict, key: str) -> None:
        """The sample's media members and the record agree. Otherwise a LLaVA-style record (`<image>` in the text,
        the image a member no part names) would train as a text-only chat on the literal placeholder."""
        store = raw.get("media") or {}
        named = {n for p in parts if p["type"] in ("image", "video") for n in _names(p)}
        found = sorted({ph for t in texts for ph in LLAVA_PLACEHOLDERS if ph in t})
        if found and (store or named):  # without media, "<video>" is just text (an HTML page, say)
            raise BadSample("llava_placeholder", key, f"the text holds LLaVA placeholder(s) {found} beside media "
                                                      f"{sorted(store)}; media must be image/video parts of the "
                                                      f"record: convert LLaVA data with `python -m data.convert "
                                                      f"--format llava`")
        unreferenced = sorted(set(store) - named - {teacher.MEMBER})
        if unreferenced:
            raise BadSample("unreferenced_media", key, f"members {unreferenced} are in the sample but no image/video "
                                                       f"part of the record names them; name them in a part or drop "
                                                       f"them from the shard (LLaVA data: `python -m data.convert "
                                                       f"--format llava`)")

    # ------------------------------------------------------------ records -> samples

    def _chat(self, messages: list[dict], raw: dict, key: str, base: dict, kind=None, last_only=False,
              generation_prompt=False) -> dict:
        parts = []
        for m in messages:
            if m["role"] == "assistant" and not self._has_text(m["content"]):
                raise BadSample("empty_assistant", key)
            if not isinstance(m["content"], str):
                parts += m["content"]
        media = self._media(parts, raw, key)
        rendered = [m if isinstance(m["content"], str) else
                    dict(m, content=[self._render(p, media, key) for p in m["content"]]) for m in messages]
        try:
            text = self.tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's errors are no ValueError; the template runs on untrusted messages
            raise BadSample("bad_record", key, f"the chat template refused the messages: {type(e).__name__}: "
                                               f"{e}") from None
        ids, out = self._tokenize(text, media, key)
        labels = torch.full_like(ids, IGNORE)
        if not generation_prompt:
            spans = self._assistant_spans(ids.tolist())
            for s, e in spans[-1:] if last_only else spans:
                labels[s:e] = ids[s:e]
        return dict(base, **out, input_ids=ids, labels=labels, kind=kind)

    def _document(self, parts, raw: dict, key: str, base: dict) -> dict:
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
        for p in parts:  # checked by _part
            t = p["type"]
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
                name = p["video"]
                names = _names(p)
                for n in names:
                    refuse_pickle(n, key)
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
            raise NoFamily("this Encoder was built without a family and cannot render boxes; "
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
        if self.layout == "qwen2_5_vl":
            v = self.vision
            rh, rw = smart_resize(H, W, v.factor, v.min_pixels, v.max_pixels)
            coords = [_clamp(x1 * rw / W, rw - 1), _clamp(y1 * rh / H, rh - 1),
                      _clamp(x2 * rw / W, rw - 1), _clamp(y2 * rh / H, rh - 1)]
        else:
            coords = [_clamp(x1 / W * 1000, 1000), _clamp(y1 / H * 1000, 1000),
                      _clamp(x2 / W * 1000, 1000), _clamp(y2 / H * 1000, 1000)]
        if self.layout == "qwen2_vl":
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
        if self.layout == "qwen3_vl":
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
            if self.layout == "qwen2_5_vl":
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
