"""python -m data.convert: JSONL and LLaVA inputs to shards, target size, validation errors naming the line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert import Item, main, parse_size, write_shards
from data.shards import SourceConfig, expand_urls

REPO = Path(__file__).resolve().parent.parent


def _png(path: Path, colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _mp4(n: int = 4, h: int = 16, w: int = 16) -> bytes:
    from data.video import write_mp4

    return write_mp4(np.stack([np.full((h, w, 3), 30 * t % 256, np.uint8) for t in range(n)]), fps=4)


def _dataset(d: Path, n: int = 12) -> list[dict]:
    """n JSONL records (chat, document, preference, video frames, box) with media under d/img."""
    for i in range(4):
        _png(d / "img" / f"{i}.png", (60 * i, 20, 200), size=(40 + 50 * i, 30))
    for i in range(2):  # frames of one video: one size
        _png(d / "frames" / f"{i}.png", (0, 80 * i, 0), size=(32, 24))
    (d / "clip.mp4").write_bytes(_mp4())
    records = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{i % 4}.png"},
                                                            {"type": "text", "text": f"q{i}"}]},
                                {"role": "assistant", "content": [{"type": "box", "box": [1, 2, 3, 4], "label": "x"}]}]}
        elif kind == 1:
            rec = {"content": [{"type": "text", "text": f"doc {i}"}, {"type": "image", "image": "img/1.png"},
                               {"type": "image", "image": "img/2.png"}, {"type": "image", "image": "img/1.png"}]}
        elif kind == 2:
            rec = {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4", "fps": 2.0},
                                                            {"type": "text", "text": "which way?"}]}],
                   "chosen": {"role": "assistant", "content": "left"},
                   "rejected": {"role": "assistant", "content": "right"}}
        else:
            rec = {"messages": [{"role": "user", "content": [
                {"type": "video", "video": ["frames/0.png", "frames/1.png"]}, {"type": "text", "text": "t"}]}],
                "answer": "3", "reward": "numeric"}
        records.append(rec)
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def _read_all(pattern: str, n: int) -> list[dict]:
    src = SourceConfig(name="x", urls=pattern, shuffle_shards=False).build()
    return [next(src) for _ in range(n)]


def test_jsonl_to_shards_roundtrip(tmp_path, capsys):
    records = _dataset(tmp_path)
    out = tmp_path / "out" / "mydata"
    assert main([str(tmp_path / "data.jsonl"), str(out), "--shard-size", "12KB"]) == 0
    printed = capsys.readouterr().out
    shards = sorted(str(p) for p in (tmp_path / "out").iterdir())
    assert len(shards) > 2 and all(s in printed for s in shards)
    pattern = f"{out}-{{000000..{len(shards) - 1:06d}}}.tar"
    assert pattern in printed and expand_urls(pattern) == shards
    samples = _read_all(pattern, len(records))
    assert [s["key"] for s in samples] == [f"mydata-{i:09d}" for i in range(len(records))]
    files = {f"img/{i}.png": (tmp_path / "img" / f"{i}.png").read_bytes() for i in range(4)}
    # chat with an image and a box reply: media renamed to member names, bytes unchanged
    s0 = samples[0]
    assert s0["record"]["messages"][0]["content"][0] == {"type": "image", "image": "0.png"}
    assert s0["record"]["messages"][1] == records[0]["messages"][1]
    assert s0["media"] == {"0.png": files["img/0.png"]}
    # a document naming the same image twice stores it once
    s1 = samples[1]
    assert [p.get("image") for p in s1["record"]["content"]] == [None, "0.png", "1.png", "0.png"]
    assert s1["media"] == {"0.png": files["img/1.png"], "1.png": files["img/2.png"]}
    # preference and RL fields survive; video file and frame lists become members
    s2, s3 = samples[2], samples[3]
    assert s2["record"]["chosen"] == records[2]["chosen"] and s2["record"]["rejected"] == records[2]["rejected"]
    assert s2["record"]["messages"][0]["content"][0] == {"type": "video", "video": "0.mp4", "fps": 2.0}
    assert s2["media"]["0.mp4"] == (tmp_path / "clip.mp4").read_bytes()
    assert s3["record"]["messages"][0]["content"][0]["video"] == ["0.png", "1.png"]
    assert (s3["record"]["answer"], s3["record"]["reward"]) == ("3", "numeric")


def test_shards_are_about_the_target_size(tmp_path):
    _dataset(tmp_path, n=40)
    target = parse_size("20KB")
    assert main([str(tmp_path / "data.jsonl"), str(tmp_path / "o" / "d"), "--shard-size", "20KB"]) == 0
    sizes = [os.path.getsize(p) for p in sorted((tmp_path / "o").iterdir())]
    biggest_sample = 26 * 1024  # the largest sample here (3 images) is below this
    assert len(sizes) >= 3
    assert all(target - biggest_sample < s <= target + 10240 for s in sizes[:-1]), sizes  # 10240: tar record pad


@pytest.mark.parametrize("bad,message", [
    ('{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/nope.png"}]}]}',
     "missing media file .*img/nope.png"),
    ('{"content": [{"type": "audio", "audio": "a.wav"}]}', "unknown content type 'audio'"),
    ('{"content": [{"type": "text", "text": "x"}', "bad JSON"),
    ('{"meta": 1}', "no 'messages' and no 'content'"),
    ('{"messages": []}', "non-empty list of messages"),
    ('{"content": [{"type": "image", "image": "weights.pt"}]}', r"extension \.pt"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role in"),
])
def test_each_invalid_record_is_named_by_line_and_nothing_is_written(tmp_path, capsys, bad, message):
    _dataset(tmp_path, n=6)
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    lines.insert(4, bad)  # becomes line 5
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(tmp_path / "data.jsonl"), str(tmp_path / "o" / "d")]) == 2
    err = capsys.readouterr().err
    assert f"data.jsonl:5: " in err and "1 invalid record" in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_llava_json(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "images" / f"{i}.png", (10 * i, 0, 0))
    entries = [
        {"id": "a.1", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "b", "image": ["1.png", "2.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>"}, {"from": "gpt", "value": "same"}]},
        {"id": "c", "image": "2.png", "conversations": [{"from": "human", "value": "No placeholder"},
                                                         {"from": "gpt", "value": "ok"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries, indent=2))
    assert main([str(tmp_path / "llava.json"), str(tmp_path / "o" / "ll"), "--media-root",
                 str(tmp_path / "images")]) == 0
    samples = _read_all(str(tmp_path / "o" / "ll-{000000..000000}.tar"), 4)
    assert samples[0]["record"] == {"id": "a.1", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]}
    assert samples[1]["record"]["messages"][0]["content"] == [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": "0.png"},
        {"type": "text", "text": " and "}, {"type": "image", "image": "1.png"}]
    assert samples[1]["media"]["1.png"] == (tmp_path / "images" / "2.png").read_bytes()
    assert samples[2]["record"]["messages"][0]["content"][0] == {"type": "image", "image": "0.png"}
    assert samples[3]["media"] == {}


def test_llava_errors_name_the_entry_line(tmp_path, capsys):
    _png(tmp_path / "0.png", (0, 0, 0))
    entries = [{"id": "ok", "image": "0.png", "conversations": [{"from": "human", "value": "<image> hi"},
                                                               {"from": "gpt", "value": "x"}]},
               {"id": "bad", "image": "gone.png", "conversations": [{"from": "human", "value": "<image> hi"}]},
               {"id": "two", "image": "0.png", "conversations": [{"from": "human", "value": "<image><image>"}]},
               {"id": "role", "conversations": [{"from": "robot", "value": "x"}]}]
    text = json.dumps(entries, indent=1)
    (tmp_path / "l.json").write_text(text)
    lines = text.splitlines()
    starts = [i + 1 for i, l in enumerate(lines) if l == " {"]
    assert main([str(tmp_path / "l.json"), str(tmp_path / "o" / "x")]) == 2
    err = capsys.readouterr().err
    assert f"l.json:{starts[1]}: " in err and "missing media file" in err
    assert f"l.json:{starts[2]}: " in err and "more <image> placeholders" in err
    assert f"l.json:{starts[3]}: " in err and "'from' in" in err
    assert "3 invalid record" in err and f"l.json:{starts[0]}:" not in err
    assert not (tmp_path / "o").exists()


def test_a_failed_write_leaves_no_shard(tmp_path):
    img = tmp_path / "a.png"
    _png(img, (1, 2, 3))
    items = [Item(i, {"content": [{"type": "image", "image": "0.png"}]}, {"0.png": str(img)}) for i in range(6)]
    (tmp_path / "dir.png").mkdir()  # unreadable as a file: the write fails after earlier shards were written
    items[4].media = {"0.png": str(tmp_path / "dir.png")}
    with pytest.raises(IsADirectoryError):
        write_shards(items, str(tmp_path / "o" / "d"), 600)
    assert list((tmp_path / "o").iterdir()) == []


def test_shard_size_parsing():
    assert parse_size("64MB") == 64 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="--shard-size='lots'"):
        parse_size("lots")


@pytest.mark.slow
def test_cli_module_entry_point(tmp_path):
    _dataset(tmp_path, n=4)
    ok = subprocess.run([sys.executable, "-m", "data.convert", str(tmp_path / "data.jsonl"), str(tmp_path / "s")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"{tmp_path}/s-{{000000..000000}}.tar" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "data.convert", str(tmp_path / "nope.jsonl"), str(tmp_path / "t")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.jsonl does not exist" in bad.stderr


# -- RL rewards: records name registered rewards, never code ---------------------------------------------------
def _rl(reward) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "How many?"}], "answer": "3", "reward": reward})


def _with_line_5(d: Path, line: str) -> Path:
    _dataset(d, n=6)
    lines = (d / "data.jsonl").read_text().splitlines()
    lines.insert(4, line)
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    return d / "data.jsonl"


@pytest.mark.parametrize("i", range(6))
def test_crafted_rewards_are_refused_before_any_import(i, tmp_path, capsys, monkeypatch):
    import importlib

    from reward_audit import crafted, evil_module, watching

    module, marker = evil_module(tmp_path, f"evil_convert_{i}")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = crafted(module)[i]
    path = _with_line_5(tmp_path, _rl(spec))
    assert main([str(path), str(tmp_path / "warm" / "d")]) == 2  # lazy imports of the CLI happen outside the watch
    capsys.readouterr()
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with watching(tmp_path) as events:
        rc = main([str(path), str(tmp_path / "o" / "d"), "--reward", "mine"])
    assert rc == 2 and events == [] and imported == [], (events, imported)
    assert not os.path.exists(marker) and module not in sys.modules and not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert "data.jsonl:5: reward " in err and "1 invalid record" in err, err
    assert json.dumps(spec)[:40] in err  # the record's reward field
    if not (isinstance(spec, dict) and spec.get("name") == module):
        assert "['box_iou', 'choice', 'exact_match', 'format', 'mine', 'numeric']" in err and "--reward NAME" in err
    else:  # a --reward-less name with options: refused as unregistered too
        assert f"'{module}' is not registered" in err


@pytest.mark.parametrize("reward,flags,message", [
    ({"name": "numeric", "executable": "/bin/sh"}, [], r"'numeric' takes no option\(s\) \['executable'\]"),
    ({"name": "numeric", "abs_tol": {"$ref": 1}}, [], "not JSON scalars"),
    ({"name": "mine", "k": [1, {"a": 2}]}, ["--reward", "mine"], "not JSON scalars"),
    ("mine", [], "'mine' is not registered"),
    (7, [], "not a name or a mapping"),
])
def test_bad_reward_options_and_unregistered_names_are_refused(tmp_path, capsys, reward, flags, message):
    import re

    path = _with_line_5(tmp_path, _rl(reward))
    assert main([str(path), str(tmp_path / "o" / "d"), *flags]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:5: reward " in err and re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_rewards_named_with_reward_flag_and_declared_options_pass(tmp_path, capsys):
    path = _with_line_5(tmp_path, _rl({"name": "mine", "limit": 3, "tags": ["a", 1, None]}))
    with open(path, "a") as f:
        f.write(_rl({"name": "box_iou", "threshold": 0.7}) + "\n" + _rl("format") + "\n")
    assert main([str(path), str(tmp_path / "o" / "d"), "--reward", "mine", "--reward", "other"]) == 0
    samples = _read_all(str(tmp_path / "o" / "d-{000000..000000}.tar"), 9)
    assert samples[4]["record"]["reward"] == {"name": "mine", "limit": 3, "tags": ["a", 1, None]}
    assert main([str(path), str(tmp_path / "o2" / "d"), "--reward", "pkg.mod:fn"]) == 2
    assert "--reward 'pkg.mod:fn': give the reward's registered name" in capsys.readouterr().err


# -- the record format document: every ```json example converts and encodes ----------------------------------
RECORDS_MD = REPO / "data" / "RECORDS.md"


def _examples() -> list:
    import re

    blocks = re.findall(r"^```json\n(.*?)^```", RECORDS_MD.read_text(), re.S | re.M)
    assert len(blocks) >= 9, "data/RECORDS.md lost its examples"
    return [json.loads(b) for b in blocks]


def _media_refs(obj) -> tuple[set, set]:
    """(image paths, video file paths) a record or LLaVA entry names."""
    images, videos = set(), set()
    if isinstance(obj, dict):
        if obj.get("type") == "image":
            images.add(obj["image"])
        elif obj.get("type") == "video":
            (images.update if isinstance(obj["video"], list) else videos.add)(
                obj["video"] if isinstance(obj["video"], list) else obj["video"])
        elif "conversations" in obj:  # LLaVA entry
            for k, into in (("image", images), ("video", videos)):
                v = obj.get(k)
                into.update([v] if isinstance(v, str) else v or [])
        for v in obj.values():
            i, vi = _media_refs(v)
            images |= i
            videos |= vi
    elif isinstance(obj, list):
        for v in obj:
            i, vi = _media_refs(v)
            images |= i
            videos |= vi
    return images, videos


def _kinds(rec: dict) -> set:
    """What a record of the document shows, to check that every kind keeps an example."""
    parts = [p for m in rec.get("messages", []) if isinstance(m["content"], list) for p in m["content"]]
    parts += rec.get("content", [])
    kinds = {"preference" if "chosen" in rec else "rl" if "answer" in rec or "reward" in rec
             else "chat" if "messages" in rec else "document"}
    if sum(p["type"] == "image" for p in parts) > 1:
        kinds.add("multi_image")
    for p in parts:
        if p["type"] == "box":
            kinds.add("box")
        if p["type"] == "video":
            kinds.add("video_frames" if isinstance(p["video"], list) else "video_file")
    return kinds


@pytest.fixture(scope="module")
def encoders():
    from data.encode import EncoderConfig, build_encoder
    from training.models import FAMILIES, ModelConfig, build

    return {f: build_encoder(EncoderConfig(), build(ModelConfig(family=f))) for f in sorted(FAMILIES)}


def test_every_example_of_the_record_format_converts_and_encodes(tmp_path, encoders):
    """data/RECORDS.md cannot rot: its examples are converted (media checked) and encoded by every family."""
    from data.encode import IGNORE

    examples = _examples()
    images, videos = _media_refs(examples)
    for ref in images:
        _png(tmp_path / ref, (200, 40, 40), size=(64, 48))
    for ref in videos:
        (tmp_path / ref).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ref).write_bytes(_mp4(n=8, h=32, w=32))
    records = [e for e in examples if isinstance(e, dict)]
    llava = [e for e in examples if isinstance(e, list)]
    assert llava and all("conversations" in e for entries in llava for e in entries)
    kinds = set().union(*map(_kinds, records))
    assert kinds >= {"chat", "multi_image", "box", "video_file", "video_frames", "document", "preference", "rl"}, kinds
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([str(tmp_path / "records.jsonl"), str(tmp_path / "o" / "doc"), "--workers", "2"]) == 0
    got = _read_all(str(tmp_path / "o" / "doc-000000.tar"), len(records))
    for i, entries in enumerate(llava):
        (tmp_path / f"llava{i}.json").write_text(json.dumps(entries, indent=1))
        assert main([str(tmp_path / f"llava{i}.json"), str(tmp_path / "o" / f"llava{i}")]) == 0
        got += _read_all(str(tmp_path / "o" / f"llava{i}-000000.tar"), len(entries))
    for family, enc in encoders.items():
        for raw in got:
            rec = raw["record"]
            out = enc.encode(raw)
            want = ["chosen", "rejected"] if "chosen" in rec else ["prompt"] if "answer" in rec else [None]
            assert [s["kind"] for s in out] == want, (family, rec)
            for s in out:
                supervised = int((s["labels"] != IGNORE).sum())
                assert supervised == 0 if s["kind"] == "prompt" else supervised > 0, (family, rec)
                n_img = sum(1 for m in _walk_parts(rec) if m["type"] == "image")
                assert len(s.get("image_grid_thw", [])) == n_img or s["kind"] in ("chosen", "rejected")
                assert ("video_grid_thw" in s) == any(m["type"] == "video" for m in _walk_parts(rec))
            if any(m["type"] == "box" for m in _walk_parts(rec)):
                text = enc.tok.decode(out[0]["input_ids"])
                assert ("<|box_start|>" if family == "qwen2_vl" else '"bbox_2d"') in text, text
            if "answer" in rec:
                assert out[0]["answer"] == rec["answer"] and out[0]["reward"] == rec["reward"]


def _walk_parts(rec: dict):
    for k in ("messages", "chosen", "rejected"):
        ms = rec.get(k, [])
        for m in [ms] if isinstance(ms, dict) else ms if isinstance(ms, list) else []:
            if isinstance(m.get("content"), list):
                yield from m["content"]
    yield from rec.get("content", [])


# -- media checks: decoded as the trainer decodes them, reported by source path and line -----------------------
def _bad_media_set(d: Path) -> Path:
    """6 good records, then line 7: a truncated PNG, line 8: a garbage video, line 9: the truncated PNG again."""
    _dataset(d, n=6)
    good = _png(d / "img" / "whole.png", (1, 2, 3), size=(64, 64))
    (d / "img" / "cut.png").write_bytes(good[: len(good) // 2])  # a truncated PNG: its header reads fine
    (d / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    bad = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/cut.png"}]},
                         {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": [{"type": "video", "video": "junk.mp4"}]},
                         {"role": "assistant", "content": "b"}]},
           {"content": [{"type": "text", "text": "again "}, {"type": "image", "image": "img/cut.png"}]}]
    with open(d / "data.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad))
    return d / "data.jsonl"


def test_a_truncated_png_and_a_garbage_video_are_reported_by_source_path_and_line(tmp_path, capsys):
    path = _bad_media_set(tmp_path)
    assert main([str(path), str(tmp_path / "o" / "d")]) == 2
    err = capsys.readouterr().err
    cut, junk = tmp_path / "img" / "cut.png", tmp_path / "junk.mp4"
    assert f"data.jsonl:7: image {cut} does not decode as an image (OSError: image file is truncated" in err, err
    assert f"data.jsonl:8: video {junk} does not decode as a video (" in err, err
    assert f"data.jsonl:9: image {cut} does not decode" in err, err
    assert "3 invalid record(s), nothing written" in err and "data.jsonl:6:" not in err
    assert not (tmp_path / "o").exists()


def test_no_check_media_lets_bad_files_through(tmp_path, capsys):
    path = _bad_media_set(tmp_path)
    assert main([str(path), str(tmp_path / "o" / "d"), "--no-check-media"]) == 0
    samples = _read_all(str(tmp_path / "o" / "d-000000.tar"), 9)
    assert samples[6]["media"]["0.png"] == (tmp_path / "img" / "cut.png").read_bytes()
    assert "checked" not in capsys.readouterr().err


def test_the_parallel_check_reports_what_one_worker_reports(tmp_path):
    import concurrent.futures

    from data.convert import convert

    path = _bad_media_set(tmp_path)
    with open(path, "a") as f:  # more bad files than workers, and one structural error among them
        for i in range(6):
            (tmp_path / f"junk{i}.webm").write_bytes(bytes([i]) * 100)
            f.write(json.dumps({"content": [{"type": "video", "video": f"junk{i}.webm"}]}) + "\n")
        f.write('{"messages": [{"role": "bot", "content": "x"}]}\n')
    reports = []
    for workers in (1, 4):
        with pytest.raises(ValueError) as e:
            convert(str(path), str(tmp_path / "o" / "d"), workers=workers)
        reports.append(str(e.value))
    assert reports[0] == reports[1] and reports[0].startswith("10 invalid record(s)"), reports[0]
    assert [l.split(": ")[0].rsplit(":", 1)[1] for l in reports[0].splitlines()[1:]] == \
        [str(n) for n in range(7, 17)]
    used = []
    real = concurrent.futures.ThreadPoolExecutor
    with pytest.MonkeyPatch.context() as mp:  # the parallel path is the one taken with workers > 1
        mp.setattr(concurrent.futures, "ThreadPoolExecutor", lambda n: used.append(n) or real(n))
        with pytest.raises(ValueError):
            convert(str(path), str(tmp_path / "o" / "d"), workers=3)
    assert used == [3]
    with pytest.raises(ValueError, match="--workers=0"):
        convert(str(path), str(tmp_path / "o" / "d"), workers=0)


def test_frame_lists_of_mixed_sizes_and_tiny_videos_are_refused(tmp_path, capsys):
    _dataset(tmp_path, n=2)
    (tmp_path / "one.mp4").write_bytes(_mp4(n=1))
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"content": [{"type": "video", "video": ["img/0.png", "img/1.png"]}]}) + "\n")
        f.write(json.dumps({"content": [{"type": "video", "video": "one.mp4"}]}) + "\n")
    assert main([str(tmp_path / "data.jsonl"), str(tmp_path / "o" / "d"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:3: the frames of a video differ in size [(40, 30), (90, 30)]" in err, err
    assert f"data.jsonl:4: video {tmp_path / 'one.mp4'} has 1 frame(s); a video needs at least 2" in err, err


@pytest.mark.parametrize("bad,message", [
    ({"id": "1", "image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
     "this looks like a LLaVA record: use --format llava"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "this looks like a LLaVA record: use --format llava"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                 {"type": "text", "text": "<image>\nwhat?"}]},
                   {"role": "assistant", "content": "x"}]}, r"LLaVA placeholder\(s\) \['<image>'\].*--format llava"),
    ({"messages": [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "x"}],
      "images": ["img/0.png"]}, r"top-level \['images'\] are not read"),
])
def test_llava_shaped_jsonl_records_get_the_hint(tmp_path, capsys, bad, message):
    import re

    path = _with_line_5(tmp_path, json.dumps(bad))
    assert main([str(path), str(tmp_path / "o" / "d")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:5: " in err and re.search(message, err), err


@pytest.mark.parametrize("bad,message", [
    ({"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"},
      "rejected": {"role": "user", "content": "b"}}, "rejected: a preference reply must be .* an assistant message"),
    ({"content": [{"type": "text", "text": "doc"}], "answer": "3"}, r"\['answer'\] belong to a prompt in 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "an assistant message needs some text"),
    ({"messages": [{"role": "user", "content": "q"}], "content": [{"type": "text", "text": "d"}]}, "give one"),
    ({"content": [{"type": "text", "text": "x"}, {"type": "box", "box": [1, 2, 3, 4]}]}, "a box needs an image"),
    ({"content": [{"type": "image", "image": "img/0.png"}, {"type": "box", "box": [1, 2, 3, 4], "image": "img/1.png"}]},
     "the box's image .*img/1.png is no image part"),
    ({"content": [{"type": "image", "image": "img/0.png"}, {"type": "box", "box": [1, True, 3, 4]}]}, "four finite"),
    ({"content": [{"type": "video", "video": "clip.mp4", "fps": 0}]}, "'fps' must be a number > 0"),
])
def test_records_the_encoder_would_skip_are_refused(tmp_path, capsys, bad, message):
    import re

    path = _with_line_5(tmp_path, json.dumps(bad))
    assert main([str(path), str(tmp_path / "o" / "d")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:5: " in err and "1 invalid record" in err and re.search(message, err), err


def test_box_image_becomes_a_member_name_and_string_replies_pass(tmp_path):
    _dataset(tmp_path, n=1)
    rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                      {"type": "image", "image": "img/1.png"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "box", "box": [1, 2, 3, 4], "image": "img/1.png"}]}],
           "rejected": "no"}
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    assert main([str(tmp_path / "data.jsonl"), str(tmp_path / "o" / "d")]) == 0
    s = _read_all(str(tmp_path / "o" / "d-000000.tar"), 2)[1]
    assert s["record"]["chosen"][0]["content"][0]["image"] == "1.png" and s["record"]["rejected"] == "no"


def test_llava_json_lines(tmp_path, capsys):
    _png(tmp_path / "0.png", (0, 0, 0))
    entries = [{"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "x"}]},
               {"id": "b", "conversations": [{"from": "human", "value": "yo"}, {"from": "gpt", "value": "y"}]}]
    (tmp_path / "l.jsonl").write_text("\n".join(map(json.dumps, entries)) + "\n{broken\n")
    assert main([str(tmp_path / "l.jsonl"), str(tmp_path / "o" / "l"), "--format", "llava"]) == 2
    assert "l.jsonl:3: bad JSON" in capsys.readouterr().err
    (tmp_path / "l.jsonl").write_text("\n".join(map(json.dumps, entries)) + "\n")
    assert main([str(tmp_path / "l.jsonl"), str(tmp_path / "o" / "l"), "--format", "llava"]) == 0
    samples = _read_all(str(tmp_path / "o" / "l-000000.tar"), 2)
    assert samples[0]["record"]["messages"][0]["content"] == [{"type": "image", "image": "0.png"},
                                                              {"type": "text", "text": "hi"}]
