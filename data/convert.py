"""JSONL records or LLaVA-style JSON -> WebDataset shards of about a target size.

    python -m data.convert INPUT OUTPUT_PREFIX [--shard-size 64MB] [--format auto|jsonl|llava] [--media-root DIR]
                           [--reward NAME ...]

JSONL: one record per line in the project's record format (../shared/DESIGN.md); media paths are relative to
the JSONL file (or --media-root). LLaVA: a JSON list of `{"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`; images are relative to the JSON file (or
--media-root). Every record is validated before anything is written, and every error names the file and line
(exit code 2). Shards are written under temporary names and renamed only when all are complete, so a failed
run leaves no partial output. Media are copied as bytes, never decoded. An RL record's `reward` may name only a
built-in reward or a NAME given as `--reward NAME` (one you register in the training config); an import path
('module:function') or an option that is not a JSON scalar/list is refused: data never chooses code.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.shards import write_tar
from stages.rewards import REGISTRY, RewardError, check_spec, declared_options

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
CONTENT_TYPES = ("text", "image", "video", "box")
ROLES = ("system", "user", "assistant")
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


class _Validator:
    """Checks one record and rewrites its media paths to member names ("0.jpg", "1.mp4", ...)."""

    def __init__(self, file: Path, line: int, media_root: Path, rewards=()):
        self.file, self.line, self.root = file, line, media_root
        self.rewards = rewards  # reward names (beyond the built-ins) the user will register in config
        self.media: dict[str, str] = {}  # member name -> path
        self._names: dict[str, str] = {}  # path -> member name

    def fail(self, msg: str):
        raise RecordError(self.file, self.line, msg)

    def _media(self, ref, kind: str, where: str) -> str:
        if not isinstance(ref, str) or not ref:
            self.fail(f"{where}: the {kind} must be a file path string, got {ref!r}")
        if "://" in ref:
            self.fail(f"{where}: {kind} {ref!r} is a URL; download it and give a local path")
        ext = os.path.splitext(ref)[1].lower()
        allowed = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
        if ext not in allowed:
            self.fail(f"{where}: {kind} {ref!r} has extension {ext or '(none)'}; expected one of {list(allowed)}")
        path = (self.root / ref) if not os.path.isabs(ref) else Path(ref)
        if not path.is_file():
            self.fail(f"{where}: missing media file {path}")
        key = str(path.resolve())
        if key not in self._names:
            self._names[key] = f"{len(self._names)}{ext}"
            self.media[self._names[key]] = str(path)
        return self._names[key]

    def part(self, p, where: str) -> dict:
        if not isinstance(p, dict):
            self.fail(f"{where}: a content part must be an object, got {p!r}")
        t = p.get("type")
        if t not in CONTENT_TYPES:
            self.fail(f"{where}: unknown content type {t!r}; expected one of {list(CONTENT_TYPES)}")
        p = dict(p)
        if t == "text" and not isinstance(p.get("text"), str):
            self.fail(f"{where}: a text part needs a 'text' string")
        elif t == "image":
            p["image"] = self._media(p.get("image"), "image", where)
        elif t == "video":
            v = p.get("video")
            if isinstance(v, list):  # a video given as its frame images
                if not v:
                    self.fail(f"{where}: a video given as frames needs at least one frame")
                p["video"] = [self._media(f, "image", f"{where} frame {i}") for i, f in enumerate(v)]
            else:
                p["video"] = self._media(v, "video", where)
        elif t == "box":
            b = p.get("box")
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(x, (int, float)) for x in b)):
                self.fail(f"{where}: a box part needs 'box': [x1, y1, x2, y2], got {b!r}")
        return p

    def content(self, content, where: str):
        if isinstance(content, str):
            return content
        if not isinstance(content, list) or not content:
            self.fail(f"{where}: content must be a non-empty list of parts or a string")
        return [self.part(p, f"{where} part {i}") for i, p in enumerate(content)]

    def message(self, m, where: str) -> dict:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            self.fail(f"{where}: a message needs a role in {list(ROLES)}, got {m!r:.80}")
        if "content" not in m:
            self.fail(f"{where}: message has no content")
        return {**m, "content": self.content(m["content"], where)}

    def messages(self, ms, where: str):
        if isinstance(ms, dict):  # a single message (preference chosen/rejected)
            return self.message(ms, where)
        if not isinstance(ms, list) or not ms:
            self.fail(f"{where}: must be a non-empty list of messages")
        return [self.message(m, f"{where}[{i}]") for i, m in enumerate(ms)]

    def record(self, rec) -> Item:
        if not isinstance(rec, dict):
            self.fail(f"the record must be a JSON object, got {type(rec).__name__}")
        rec = copy.deepcopy(rec)
        if "messages" in rec:
            rec["messages"] = self.messages(rec["messages"], "messages")
        elif "content" in rec:
            rec["content"] = self.content(rec["content"], "content")
            if isinstance(rec["content"], str):
                self.fail("content: a role-less document needs a list of parts")
        else:
            self.fail("the record has no 'messages' and no 'content'")
        for k in ("chosen", "rejected"):
            if k in rec:
                rec[k] = self.messages(rec[k], k)
        if ("chosen" in rec) != ("rejected" in rec):
            self.fail("a preference record needs both 'chosen' and 'rejected'")
        self.reward(rec.get("reward"))
        return Item(self.line, rec, self.media)

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


def _json_array_entries(path: Path):
    """(line, entry) for each element of a top-level JSON array, so errors can name the entry's line."""
    text = Path(path).read_text(encoding="utf-8")
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
    items, errors = [], []
    try:
        for line, entry in _json_array_entries(path):
            v = _Validator(path, line, media_root)
            try:
                items.append(v.record(llava_to_record(entry, v.fail)))
            except RecordError as e:
                errors.append(e)
    except RecordError as e:
        errors.append(e)
    return items, errors


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
            media_root: str | None = None, rewards=()) -> list[str]:
    """Validates every record, then writes the shards. Raises ValueError listing every invalid record.
    `rewards`: reward names, beyond the built-ins, that records may name (registered in the training config)."""
    for name in rewards:
        if ":" in name or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
            raise ValueError(f"--reward {name!r}: give the reward's registered name (as in stage.objective.rewards), "
                             f"not an import path")
    path = Path(input_path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() == ".jsonl" else "llava" if path.suffix.lower() == ".json" else ""
        if not fmt:
            raise ValueError(f"cannot tell the format of {path} from its extension; pass --format jsonl|llava")
    root = Path(media_root) if media_root else path.parent
    items, errors = read_jsonl(path, root, tuple(rewards)) if fmt == "jsonl" else read_llava(path, root)
    if errors:
        shown = "\n".join(str(e) for e in errors[:50])
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise ValueError(f"{len(errors)} invalid record(s), nothing written:\n{shown}{more}")
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
    args = ap.parse_args(argv)
    try:
        shards = convert(args.input, args.output_prefix, parse_size(args.shard_size), args.format, args.media_root,
                         args.reward)
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
