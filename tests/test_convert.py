"""python -m data.convert: JSONL and LLaVA inputs to shards, target size, validation errors naming the line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

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


def _dataset(d: Path, n: int = 12) -> list[dict]:
    """n JSONL records (chat, document, preference, video frames, box) with media under d/img."""
    for i in range(4):
        _png(d / "img" / f"{i}.png", (60 * i, 20, 200), size=(40 + 50 * i, 30))
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
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
                {"type": "video", "video": ["img/0.png", "img/3.png"]}, {"type": "text", "text": "t"}]}],
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
