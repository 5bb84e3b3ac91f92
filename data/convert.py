"""JSONL records or LLaVA-style JSON -> WebDataset shards of about a target size.

    python -m data.convert INPUT OUTPUT_PREFIX [--shard-size 64MB] [--format auto|jsonl|llava] [--media-root DIR]
                           [--reward NAME ...] [--workers N] [--no-check-media]

JSONL: one record per line in the project's record format (data/RECORDS.md); media paths are relative to the
JSONL file (or --media-root). LLaVA: a JSON list (or JSON lines) of `{"id", "image", "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`; images are relative to the file (or
--media-root). Every record is validated before anything is written, and every error names the file and line
(exit code 2, every bad record listed). Media are then checked as the trainer reads them: every image is decoded
(PIL open + load) and every video probed (data/video.py: frame count and rate, first frame decoded), once per
file, in parallel (--workers; --no-check-media skips this for huge sets); a bad file is reported by its path and
the file:line of each record naming it. Shards are written under temporary names and renamed only when all are
complete, so a failed run leaves no partial output. Media are stored as the files' bytes, unchanged. An RL
record's `reward` may name only a built-in reward or a NAME given as `--reward NAME` (one you register in the
training config); an import path ('module:function') or an option that is not a JSON scalar/list is refused:
data never chooses code.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data.shards import write_tar
from stages.rewards import REGISTRY, RewardError, check_spec, declared_options

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
CONTENT_TYPES = ("text", "image", "video", "box")
ROLES = ("system", "user", "assistant")
LLAVA_PLACEHOLDERS = ("<image>", "<video>")
LLAVA_HINT = "this looks like a LLaVA record: use --format llava"
# top-level keys other formats use for media; the encoder reads media only from parts, so they would be lost
MEDIA_KEYS = ("image", "images", "video", "videos")
MAX_RATIO = 200  # data.vision.smart_resize refuses a larger aspect ratio (BadSample extreme_aspect_ratio)
MIN_VIDEO_FRAMES = 2  # data.video.smart_nframes needs at least FRAME_FACTOR source frames
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}


class RecordError(ValueError):
    """One invalid input record: `file:line: message`."""

    def __init__(self, file, line: int, msg: str):
        self.file, self.line, self.msg = str(file), line, msg
        super().__init__(f"{file}:{line}: {msg}")


@dataclass
class Item:
    """A validated record, its media (member name -> source path) and where it came from."""

    line: int
    record: dict
    media: dict = field(default_factory=dict)
    file: str = ""
    frames: list = field(default_factory=list)  # member-name lists of the videos given as frame images

    def tar_size(self, record_bytes: bytes) -> int:
        sizes = [len(record_bytes)] + [os.path.getsize(p) for p in self.media.values()]
        return sum(512 + -(-s // 512) * 512 for s in sizes)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"--shard-size={text!r}: write a size like 64MB, 500KB, 1GiB or a byte count")
    return max(1, int(float(m.group(1)) * UNITS[m.group(2).lower()]))


# ---- validation -----------------------------------------------------------------------------------
REWARD_HINT = ("pass --reward NAME for a reward you register in the training config "
               "(stage.objective.rewards: {NAME: 'package.module:function'})")


def _number(v) -> bool:
    """A finite JSON number (json.loads accepts NaN and Infinity; a bool is not a number here), as the encoder."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Validator:
    """Checks one record and rewrites its media paths to member names ("0.jpg", "1.mp4", ...).

    Beyond the types, it refuses what the trainer's encoder (data/encode.py) would skip as a bad sample, so that
    a record that converts also trains."""

    def __init__(self, file: Path, line: int, media_root: Path, rewards=()):
        self.file, self.line, self.root = file, line, media_root
        self.rewards = rewards  # reward names (beyond the built-ins) the user will register in config
        self.media: dict[str, str] = {}  # member name -> path
        self._names: dict[str, str] = {}  # path -> member name
        self.frames: list[list[str]] = []  # member names of each video given as frames
        self.images: set[str] = set()  # member names of the image parts
        self.boxes: list[tuple[dict, str]] = []  # box parts, where they are
        self.texts: list[str] = []

    def fail(self, msg: str):
        raise RecordError(self.file, self.line, msg)

    def _path(self, ref, kind: str, where: str) -> Path:
        if not isinstance(ref, str) or not ref:
            self.fail(f"{where}: the {kind} must be a file path string, got {ref!r}")
        if "://" in ref:
            self.fail(f"{where}: {kind} {ref!r} is a URL; download it and give a local path")
        ext = os.path.splitext(ref)[1].lower()
        allowed = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
        if ext not in allowed:
            self.fail(f"{where}: {kind} {ref!r} has extension {ext or '(none)'}; expected one of {list(allowed)}")
        return (self.root / ref) if not os.path.isabs(ref) else Path(ref)

    def _media(self, ref, kind: str, where: str) -> str:
        path = self._path(ref, kind, where)
        if not path.is_file():
            self.fail(f"{where}: missing media file {path}")
        key = str(path.resolve())
        if key not in self._names:
            self._names[key] = f"{len(self._names)}{os.path.splitext(ref)[1].lower()}"
            self.media[self._names[key]] = str(path)
        return self._names[key]

    def part(self, p, where: str) -> dict:
        if not isinstance(p, dict):
            self.fail(f"{where}: a content part must be an object, got {p!r}")
        t = p.get("type")
        if t not in CONTENT_TYPES:
            self.fail(f"{where}: unknown content type {t!r}; expected one of {list(CONTENT_TYPES)}")
        p = dict(p)
        if t == "text":
            if not isinstance(p.get("text"), str):
                self.fail(f"{where}: a text part needs a 'text' string")
            self.texts.append(p["text"])
        elif t == "image":
            p["image"] = self._media(p.get("image"), "image", where)
            self.images.add(p["image"])
        elif t == "video":
            v = p.get("video")
            if isinstance(v, list):  # a video given as its frame images
                if not v:
                    self.fail(f"{where}: a video given as frames needs at least one frame")
                p["video"] = [self._media(f, "image", f"{where} frame {i}") for i, f in enumerate(v)]
                self.frames.append(p["video"])
            else:
                p["video"] = self._media(v, "video", where)
            if p.get("fps") is not None and not (_number(p["fps"]) and p["fps"] > 0):
                self.fail(f"{where}: a video's 'fps' must be a number > 0, got {p['fps']!r}")
        elif t == "box":
            b = p.get("box")
            if not (isinstance(b, list) and len(b) == 4 and all(_number(x) for x in b)):
                self.fail(f"{where}: a box part needs 'box': [x1, y1, x2, y2], four finite numbers, got {b!r}")
            if not isinstance(p.get("label", ""), (str, type(None))):
                self.fail(f"{where}: a box's 'label' must be a string, got {p['label']!r}")
            if p.get("image") is not None:
                p["image"] = str(self._path(p["image"], "image", where).resolve())  # a member name in record()
            self.boxes.append((p, where))
        return p

    def content(self, content, where: str):
        if isinstance(content, str):
            self.texts.append(content)
            return content
        if not isinstance(content, list) or not content:
            self.fail(f"{where}: content must be a non-empty list of parts or a string")
        return [self.part(p, f"{where} part {i}") for i, p in enumerate(content)]

    def message(self, m, where: str) -> dict:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            self.fail(f"{where}: a message needs a role in {list(ROLES)}, got {m!r:.80}")
        if "content" not in m:
            self.fail(f"{where}: message has no content")
        m = {**m, "content": self.content(m["content"], where)}
        c = m["content"]
        if m["role"] == "assistant" and not (c.strip() if isinstance(c, str) else any(
                (p["type"] == "text" and p["text"].strip()) or p["type"] == "box" for p in c)):
            self.fail(f"{where}: an assistant message needs some text (or a box) to learn")
        return m

    def messages(self, ms, where: str):
        if isinstance(ms, dict):  # a single message (preference chosen/rejected)
            return self.message(ms, where)
        if not isinstance(ms, list) or not ms:
            self.fail(f"{where}: must be a non-empty list of messages")
        return [self.message(m, f"{where}[{i}]") for i, m in enumerate(ms)]

    def reply(self, r, where: str):
        """A preference reply: an assistant message, a list of messages ending with one, or a string."""
        if isinstance(r, str):  # the encoder reads it as an assistant text
            self.message({"role": "assistant", "content": r}, where)
            return r
        out = self.messages(r, where)
        last = out if isinstance(out, dict) else out[-1]
        if last["role"] != "assistant":
            self.fail(f"{where}: a preference reply must be (or end with) an assistant message")
        return out

    def record(self, rec) -> Item:
        if not isinstance(rec, dict):
            self.fail(f"the record must be a JSON object, got {type(rec).__name__}")
        if "conversations" in rec or ("messages" not in rec and "content" not in rec and
                                      any(k in rec for k in ("image", "video"))):
            key = next(k for k in ("conversations", "image", "video") if k in rec)
            self.fail(f"the record has a {key!r} key and no 'messages'; {LLAVA_HINT}")
        media_keys = [k for k in MEDIA_KEYS if k in rec]
        if media_keys:
            self.fail(f"top-level {media_keys} are not read: media go in the message content as parts "
                      f"{{\"type\": \"image\", \"image\": PATH}} where they appear (data/RECORDS.md)")
        rec = copy.deepcopy(rec)
        if "messages" in rec and "content" in rec:
            self.fail("the record has both 'messages' (a chat) and 'content' (a document); give one")
        if "messages" in rec:
            rec["messages"] = self.messages(rec["messages"], "messages")
            if isinstance(rec["messages"], dict):
                self.fail("messages: must be a list of messages")
        elif "content" in rec:
            rec["content"] = self.content(rec["content"], "content")
            if isinstance(rec["content"], str):
                self.fail("content: a role-less document needs a list of parts")
        else:
            self.fail("the record has no 'messages' and no 'content'")
        for k in ("chosen", "rejected"):
            if k in rec:
                rec[k] = self.reply(rec[k], k)
        if ("chosen" in rec) != ("rejected" in rec):
            self.fail("a preference record needs both 'chosen' and 'rejected'")
        kind = [k for k in ("chosen", "rejected", "answer", "reward") if k in rec]
        if kind and "messages" not in rec:
            self.fail(f"{kind} belong to a prompt in 'messages', not to a 'content' document")
        self.reward(rec.get("reward"))
        self._boxes()
        found = sorted({ph for t in self.texts for ph in LLAVA_PLACEHOLDERS if ph in t})
        if found and self.media:
            self.fail(f"the text holds LLaVA placeholder(s) {found} beside image/video parts (the parts already place "
                      f"the media: drop the placeholders); a LLaVA file: convert it with --format llava")
        return Item(self.line, rec, self.media, str(self.file), self.frames)

    def _boxes(self) -> None:
        """A box refers to an image part of the record (its 'image', else the first image)."""
        for p, where in self.boxes:
            if not self.images:
                self.fail(f"{where}: a box needs an image in the record to refer to")
            if p.get("image") is not None:
                name = self._names.get(p["image"])
                if name not in self.images:
                    self.fail(f"{where}: the box's image {p['image']} is no image part of the record")
                p["image"] = name

    def reward(self, spec) -> None:
        """A reward spec names a built-in or a --reward name, with JSON options (a built-in's: declared ones).
        Checked by name only: nothing is imported or called."""
        if spec is None:  # the training config's default_reward applies
            return
        known = {n: declared_options(f) for n, f in REGISTRY.items()}
        known.update({n: None for n in self.rewards if n not in known})  # options checked at training start-up
        try:
            check_spec(spec, known, REWARD_HINT)
        except RewardError as e:
            self.fail(f"reward {json.dumps(spec)[:160]}: {e}")


# ---- readers ------------------------------------------------------------------------------------
def read_jsonl(path: Path, media_root: Path, rewards=()) -> tuple[list[Item], list[RecordError]]:
    items, errors = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(path, line_no, f"bad JSON: {e.msg} at column {e.colno}") from None
                items.append(_Validator(path, line_no, media_root, rewards).record(rec))
            except RecordError as e:
                errors.append(e)
    return items, errors


def _json_array_entries(path: Path, text: Optional[str] = None):
    """(line, entry) for each element of a top-level JSON array, so errors can name the entry's line."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    dec = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos >= len(text) or text[pos] != "[":
        raise RecordError(path, line_of(pos), "a LLaVA file must be a JSON list of entries")
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            entry, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, f"bad JSON: {e.msg} at column {e.colno}") from None
        yield line_of(pos), entry
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            raise RecordError(path, line_of(pos), "bad JSON: expected ',' or ']' between entries")


def llava_to_record(entry, fail) -> dict:
    """One LLaVA entry -> the record format; `<image>`/`<video>` placeholders become media parts in place."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list) or not entry["conversations"]:
        fail("a LLaVA entry needs a non-empty 'conversations' list")
    media = {}
    for kind in ("image", "video"):
        v = entry.get(kind)
        media[kind] = [] if v is None else [v] if isinstance(v, str) else list(v) if isinstance(v, list) else fail(
            f"'{kind}' must be a path or a list of paths, got {v!r}")
    placed = {"image": 0, "video": 0}
    messages = []
    for i, turn in enumerate(entry["conversations"]):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            fail(f"conversations[{i}] needs 'from' in {list(LLAVA_ROLES)} and a 'value' string, got {turn!r:.80}")
        parts = []
        for j, piece in enumerate(re.split(r"(<image>|<video>)", turn["value"])):
            if piece in ("<image>", "<video>"):
                kind = piece[1:-1]
                if placed[kind] >= len(media[kind]):
                    fail(f"conversations[{i}] has more {piece} placeholders than the entry's {len(media[kind])} "
                         f"'{kind}' paths")
                parts.append({"type": kind, kind: media[kind][placed[kind]]})
                placed[kind] += 1
            else:
                text = piece[1:] if j > 0 and piece.startswith("\n") else piece  # "<image>\n" line break
                if text:
                    parts.append({"type": "text", "text": text})
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": parts})
    for kind in ("image", "video"):
        left = media[kind][placed[kind]:]
        if left and placed[kind]:
            fail(f"the entry has {len(media[kind])} '{kind}' paths but {placed[kind]} <{kind}> placeholders")
        if left:  # no placeholder at all: media go before the first user text, as LLaVA's loaders do
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                fail(f"the entry has '{kind}' but no human turn to put it in")
            first_user["content"][:0] = [{"type": kind, kind: p} for p in left]
    rec = {"messages": messages}
    if "id" in entry:
        rec["id"] = entry["id"]
    return rec


def read_llava(path: Path, media_root: Path) -> tuple[list[Item], list[RecordError]]:
    """A JSON list of LLaVA entries, or JSON lines of them (one entry per line)."""
    items, errors = [], []

    def one(line: int, entry) -> None:
        v = _Validator(path, line, media_root)
        try:
            items.append(v.record(llava_to_record(entry, v.fail)))
        except RecordError as e:
            errors.append(e)

    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip()[:1] == "[":
        try:
            for line, entry in _json_array_entries(path, text):
                one(line, entry)
        except RecordError as e:
            errors.append(e)
        return items, errors
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(RecordError(path, line_no, f"bad JSON: {e.msg} at column {e.colno} (a LLaVA file is a "
                                                     f"JSON list of entries or one entry per line)"))
            continue
        one(line_no, entry)
    return items, errors


# ---- media checks -------------------------------------------------------------------------------
def probe_media(path: str) -> tuple[Optional[str], Optional[tuple]]:
    """(problem or None, (width, height) of an image or None) of one media file, read as the trainer reads it:
    images decoded whole with data.vision.decode_image (PIL open + load: truncated and corrupt files fail), videos
    probed with data.video's PyAV path (frame count and rate from the container, then the first frame decoded)."""
    from data.errors import BadSample
    from data.video import decode_mp4, mp4_info
    from data.vision import decode_image

    name = os.path.basename(path)

    def detail(e: BadSample) -> str:
        d = e.detail
        return d[len(repr(name)) + 2:] if d.startswith(f"{name!r}: ") else d

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"cannot be read: {type(e).__name__}: {e}", None
    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        try:
            total, fps = mp4_info(data, name, "convert")
            kept, _ = decode_mp4(data, name, "convert", [0], 0)
        except BadSample as e:
            return f"does not decode as a video ({detail(e)})", None
        if 0 not in kept:
            return "does not decode as a video (no frame decodes)", None
        if total < MIN_VIDEO_FRAMES:
            return f"has {total} frame(s); a video needs at least {MIN_VIDEO_FRAMES}", None
        return None, None
    try:
        img = decode_image(data, name, "convert")
    except BadSample as e:
        return f"does not decode as an image ({detail(e)})", None
    w, h = img.size
    if max(w, h) / max(1, min(w, h)) > MAX_RATIO:
        return f"is {w}x{h}, an aspect ratio over {MAX_RATIO} (the image processor refuses it)", None
    return None, (w, h)


def check_media(items: list[Item], workers: int) -> tuple[list[RecordError], int]:
    """(the records whose media the trainer could not use, the number of files checked). Every file is checked
    once, in parallel over `workers` threads (PIL's decoders and PyAV release the GIL while decoding); the
    report is in record order whatever the number of workers."""
    paths = list(dict.fromkeys(p for it in items for p in it.media.values()))
    results: dict[str, tuple] = {}
    if workers <= 1 or len(paths) <= 1:
        results = {p: probe_media(p) for p in paths}
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            for i in range(0, len(paths), 4096):  # bounded: a huge set never holds all futures at once
                chunk = paths[i:i + 4096]
                results.update(zip(chunk, ex.map(probe_media, chunk)))
    errors = []
    for it in items:
        for name, path in it.media.items():
            problem = results[path][0]
            if problem:
                kind = "video" if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS else "image"
                errors.append(RecordError(it.file, it.line, f"{kind} {path} {problem}"))
        for frames in it.frames:
            sizes = {results[it.media[n]][1] for n in frames}
            if None not in sizes and len(sizes) > 1:
                errors.append(RecordError(it.file, it.line, f"the frames of a video differ in size "
                                                            f"{sorted(sizes)}: {[it.media[n] for n in frames]}"))
    return errors, len(paths)


# ---- writing ------------------------------------------------------------------------------------
def _key_stem(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(prefix)) or "sample"


def write_shards(items: list[Item], prefix: str, shard_size: int) -> list[str]:
    """Groups items into shards of about shard_size bytes; temp names first, renamed once all are written."""
    stem = _key_stem(prefix)
    groups: list[list] = [[]]
    size = 1024  # end-of-archive blocks
    for n, it in enumerate(items):
        rec = json.dumps(it.record, ensure_ascii=False).encode()
        s = it.tar_size(rec)
        if groups[-1] and size + s > shard_size:
            groups.append([])
            size = 1024
        groups[-1].append((f"{stem}-{n:09d}", rec, it))
        size += s
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    finals = [f"{prefix}-{i:06d}.tar" for i in range(len(groups))]
    temps = [f"{f}.tmp{os.getpid()}" for f in finals]
    try:
        for tmp, group in zip(temps, groups):
            write_tar(tmp, ((key, {"json": rec, **{n: Path(p).read_bytes() for n, p in it.media.items()}})
                            for key, rec, it in group))
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return finals


def brace_pattern(prefix: str, n: int) -> str:
    return f"{prefix}-{{{0:06d}..{n - 1:06d}}}.tar"


def convert(input_path: str, prefix: str, shard_size: int = 64 * 10**6, fmt: str = "auto",
            media_root: str | None = None, rewards=(), check: bool = True, workers: int | None = None,
            log=None) -> list[str]:
    """Validates every record (and, with `check`, decodes its media), then writes the shards. Raises ValueError
    listing every invalid record. `rewards`: reward names, beyond the built-ins, that records may name (registered
    in the training config). `workers`: threads of the media check (default os.cpu_count())."""
    for name in rewards:
        if ":" in name or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
            raise ValueError(f"--reward {name!r}: give the reward's registered name (as in stage.objective.rewards), "
                             f"not an import path")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers={workers!r}: give a number of threads >= 1")
    path = Path(input_path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() == ".jsonl" else "llava" if path.suffix.lower() == ".json" else ""
        if not fmt:
            raise ValueError(f"cannot tell the format of {path} from its extension; pass --format jsonl|llava")
    root = Path(media_root) if media_root else path.parent
    items, errors = read_jsonl(path, root, tuple(rewards)) if fmt == "jsonl" else read_llava(path, root)
    if check and items:
        t0 = time.perf_counter()
        bad, n = check_media(items, workers)
        errors = sorted(errors + bad, key=lambda e: (e.file, e.line))  # stable: a record's own order is kept
        if log:
            log(f"checked {n} media file(s) in {time.perf_counter() - t0:.1f} s ({workers} worker(s))")
    if errors:
        shown = "\n".join(str(e) for e in errors[:50])
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        records = len({(e.file, e.line) for e in errors})
        raise ValueError(f"{records} invalid record(s), nothing written:\n{shown}{more}")
    if not items:
        raise ValueError(f"{path} holds no records; nothing written")
    return write_shards(items, prefix, shard_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output_prefix", help="shards are written as OUTPUT_PREFIX-000000.tar, ...")
    ap.add_argument("--shard-size", default="64MB", help="target shard size, e.g. 64MB, 1GiB (default 64MB)")
    ap.add_argument("--format", default="auto", choices=["auto", "jsonl", "llava"],
                    help="auto: .jsonl -> jsonl, .json -> llava")
    ap.add_argument("--media-root", default=None, help="directory media paths are relative to (default: the input's)")
    ap.add_argument("--reward", action="append", default=[], metavar="NAME",
                    help="a reward name RL records may use beyond the built-ins, which you register in the training "
                         "config (stage.objective.rewards: {NAME: 'pkg.mod:fn'}); repeatable")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="threads that decode the media (default: the CPU count, os.cpu_count())")
    ap.add_argument("--no-check-media", dest="check_media", action="store_false",
                    help="do not decode images and probe videos before writing (huge sets; the trainer then skips "
                         "bad files as it meets them)")
    args = ap.parse_args(argv)
    try:
        shards = convert(args.input, args.output_prefix, parse_size(args.shard_size), args.format, args.media_root,
                         args.reward, check=args.check_media, workers=args.workers,
                         log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in shards:
        print(f"{s}\t{os.path.getsize(s)} bytes")
    print(f"{len(shards)} shard(s). Use in a data config:\n"
          f"  data.sources='[{{name: {_key_stem(args.output_prefix)}, urls: \"{brace_pattern(args.output_prefix, len(shards))}\", "
          f"weight: 1}}]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
