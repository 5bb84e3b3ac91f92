"""Shapes cache: deterministic bytes, atomic and concurrent-safe generation, reuse, held-out split, and
records whose answers are actually right (checked against the pixels and the decoded video)."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import av
import pytest
from PIL import Image

from data import shapes
from data.mixture import MixtureConfig
from data.shards import SourceConfig

SMALL = dict(train_samples=24, heldout_samples=8, samples_per_shard=8)


def _cfg(**kw) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(**{"tasks": list(shapes.ALL_TASKS), **SMALL, **kw})


def _digest(cache: dict) -> dict:
    return {t: [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ps] for t, ps in cache.items()}


def _samples(paths: list[str]) -> list[dict]:
    """One epoch of the given shards, in order."""
    src = SourceConfig(name="x", urls=paths, shuffle_shards=False).build()
    out = []
    while True:
        s = next(src)
        if src.read_epoch > 0:
            return out
        out.append(s)


def test_cache_is_deterministic_and_reused(tmp_path):
    cfg = _cfg()
    a = shapes.ensure_cache(cfg, str(tmp_path / "a"))
    b = shapes.ensure_cache(cfg, str(tmp_path / "b"))
    assert set(a) == set(shapes.ALL_TASKS) and all(len(p) == 3 for p in a.values())
    assert _digest(a) == _digest(b), "same config, same bytes"
    manifest = Path(a["caption"][0]).parent / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert shapes.ensure_cache(cfg, str(tmp_path / "a")) == a and manifest.stat().st_mtime_ns == before
    other = shapes.ensure_cache(_cfg(seed=99), str(tmp_path / "a"))
    assert Path(other["caption"][0]).parent.parent.parent != Path(a["caption"][0]).parent.parent.parent
    assert _digest(other)["caption"] != _digest(a)["caption"]
    # the task list and weights are not part of the key: a narrower config reuses the same directories
    assert shapes.ensure_cache(_cfg(tasks=["vqa"], weights={"vqa": 3}), str(tmp_path / "a")) == {"vqa": a["vqa"]}


def test_heldout_split_differs_from_train(tmp_path):
    cfg = _cfg(tasks=["caption", "vqa", "rl"])
    train = shapes.ensure_cache(cfg, str(tmp_path))
    held = shapes.ensure_cache(cfg, str(tmp_path), split="heldout")
    for task in cfg.tasks:
        t, h = _samples(train[task]), _samples(held[task])
        assert len(t) == 24 and len(h) == 8
        assert not {s["media"]["0.png"] for s in t} & {s["media"]["0.png"] for s in h}
        assert all("-heldout-" in s["key"] for s in h)
    with pytest.raises(ValueError, match="split 'test'"):
        shapes.ensure_cache(cfg, str(tmp_path), split="test")


def _ensure_in_child(args):
    cfg_kw, cache_dir = args
    return shapes.ensure_cache(_cfg(**cfg_kw), cache_dir)


def test_concurrent_callers_get_one_complete_cache(tmp_path):
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.map(_ensure_in_child, [({"tasks": ["caption", "video"]}, str(tmp_path))] * 3)
    assert results[0] == results[1] == results[2]
    split_dir = Path(results[0]["caption"][0]).parent.parent
    assert sorted(p.name for p in split_dir.iterdir()) == ["caption", "video"], "no temp dirs left behind"
    assert _digest(results[0]) == _digest(shapes.ensure_cache(_cfg(tasks=["caption", "video"]), str(tmp_path / "x")))


def test_losing_the_publish_race_keeps_the_winner(tmp_path):
    """A caller that finishes second finds the directory published: it drops its copy and uses the winner's."""
    cfg = _cfg(tasks=["text"])
    first = shapes.ensure_cache(cfg, str(tmp_path))["text"]
    final = Path(first[0]).parent
    before = _digest({"t": first})
    shapes._write_task(cfg, "text", "train", final)  # as a racing rank would, after the winner's rename
    assert sorted(p.name for p in final.parent.iterdir()) == ["text"]
    assert _digest({"t": first}) == before


def test_a_crash_mid_generation_publishes_nothing(tmp_path, monkeypatch):
    cfg = _cfg(tasks=["vqa"])
    calls = []

    def failing(cfg_, task, index, split="train"):
        calls.append(index)
        if index == 13:
            raise RuntimeError("killed")
        return real(cfg_, task, index, split)

    real = shapes.generate
    monkeypatch.setattr(shapes, "generate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        shapes.ensure_cache(cfg, str(tmp_path))
    monkeypatch.setattr(shapes, "generate", real)
    split_dir = tmp_path / f"shapes-{shapes.cache_key(cfg)}" / "train"
    assert list(split_dir.iterdir()) == [], "neither the task dir nor its temp dir survives"
    assert len(_samples(shapes.ensure_cache(cfg, str(tmp_path))["vqa"])) == 24


def _nearest_colour(rgb) -> str:
    return min(shapes.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(shapes.COLOURS[c], rgb)))


def test_records_are_well_formed_and_answers_are_right(tmp_path):
    cfg = _cfg(train_samples=48, samples_per_shard=48)
    cache = shapes.ensure_cache(cfg, str(tmp_path))
    data = {t: _samples(p) for t, p in cache.items()}
    assert all(len(v) == 48 for v in data.values())
    for task, samples in data.items():
        assert all(s["record"]["source"] == f"shapes_{task}" for s in samples)
    # caption and text are role-less documents; text has no media
    assert all("content" in s["record"] and "messages" not in s["record"] for s in data["caption"] + data["text"])
    assert all(s["media"] == {} for s in data["text"])
    # grounding: boxes inside the image, labelled colour visible at the box centre (allowing for occlusion)
    hits, reply_boxes, question_boxes = 0, 0, 0
    for s in data["grounding"]:
        img = Image.open(io.BytesIO(s["media"]["0.png"])).convert("RGB")
        user, reply = s["record"]["messages"]
        boxes = [p for m in (user, reply) for p in m["content"] if p["type"] == "box"]
        assert len(boxes) == 1
        x1, y1, x2, y2 = boxes[0]["box"]
        assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
        colour = (boxes[0]["label"].split()[0] if reply["content"][0]["type"] == "box" else reply["content"][0]["text"])
        reply_boxes += reply["content"][0]["type"] == "box"
        question_boxes += reply["content"][0]["type"] == "text"
        hits += _nearest_colour(img.getpixel(((x1 + x2) // 2, (y1 + y2 * 2) // 3))) == colour
    assert reply_boxes > 5 and question_boxes > 5 and hits >= 0.8 * len(data["grounding"])
    # vqa / rl / preference: one right answer, of the type the reward expects
    for s in data["rl"]:
        rec = s["record"]
        assert rec["reward"] == "exact_match"  # one-word answers: "3 red circles" must not earn a count's reward
        assert rec["answer"].isdigit() or rec["answer"] in shapes.COLOURS
    for s in data["preference"]:
        rec = s["record"]
        assert [m["role"] for m in rec["messages"]] == ["user"]
        chosen, rejected = rec["chosen"]["content"][0]["text"], rec["rejected"]["content"][0]["text"]
        assert chosen != rejected and chosen.isdigit() == rejected.isdigit()
    counts = [s for s in data["vqa"] if s["record"]["messages"][0]["content"][1]["text"].startswith("How many")]
    assert 0 < len(counts) < 48
    assert all(1 <= int(s["record"]["messages"][1]["content"][0]["text"]) <= cfg.max_shapes for s in counts)


def test_videos_are_real_mp4_and_the_answer_is_the_motion(tmp_path):
    cfg = _cfg(tasks=["video"])
    samples = _samples(shapes.ensure_cache(cfg, str(tmp_path))["video"])
    answers = set()
    for s in samples:
        user, reply = s["record"]["messages"]
        part, question = user["content"]
        assert part == {"type": "video", "video": "0.mp4", "fps": cfg.video_fps}
        colour = question["text"].split()[4]
        with av.open(io.BytesIO(s["media"]["0.mp4"])) as c:
            stream = c.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert stream.average_rate == cfg.video_fps
        assert len(frames) == cfg.video_frames and frames[0].shape == (cfg.video_size, cfg.video_size, 3)

        def centre(frame):
            target = shapes.COLOURS[colour]
            pts = [(x, y) for y in range(frame.shape[0]) for x in range(frame.shape[1])
                   if sum((int(a) - b) ** 2 for a, b in zip(frame[y, x], target)) < 40 ** 2]
            return sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)

        (xa, ya), (xb, yb) = centre(frames[0]), centre(frames[-1])
        dx, dy = xb - xa, yb - ya
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == reply["content"][0]["text"], (s["key"], dx, dy)
        answers.add(seen)
    assert answers == {"left", "right", "up", "down"}


def test_source_configs_feed_a_mixture(tmp_path):
    cfg = _cfg(tasks=["caption", "text", "rl"], weights={"rl": 2})
    sources = shapes.source_configs(cfg, str(tmp_path))
    assert [(s.name, s.weight) for s in sources] == [("shapes_caption", 1.0), ("shapes_text", 1.0), ("shapes_rl", 2.0)]
    mix = MixtureConfig(sources=sources, seed=0).build(rank=1, world=2)
    got = [next(mix) for _ in range(40)]
    assert {s["source"] for s in got} == {"shapes_caption", "shapes_text", "shapes_rl"}
    assert all(s["record"]["source"] == s["source"] for s in got)
    with pytest.raises(ValueError, match=r"data.weights names \['vqa'\]"):
        shapes.source_configs(_cfg(tasks=["caption"], weights={"vqa": 1}), str(tmp_path))
    with pytest.raises(ValueError, match="data.tasks contains \\['pictures'\\]"):
        shapes.ensure_cache(_cfg(tasks=["pictures"]), str(tmp_path))


def test_sample_keeps_serving_the_indexed_loader():
    cfg = shapes.ShapesConfig()
    rec, media = shapes.sample(cfg, 1)
    assert rec["source"] == "shapes_vqa" and isinstance(media["0.png"], Image.Image)
    with pytest.raises(ValueError, match="knows"):
        shapes.sample(shapes.ShapesConfig(tasks=["video"]), 0)


@pytest.mark.slow
def test_default_cache_generates(tmp_path):
    """The default config's cache (all tasks, train split) is generated and complete (time it with --durations)."""
    cache = shapes.ensure_cache(shapes.ShapesConfig(tasks=list(shapes.ALL_TASKS)), str(tmp_path))
    assert all(len(p) == 8 for p in cache.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_every_task_encodes_with_the_project_encoder(tmp_path, family):
    """The records follow the encoder's contract: each task encodes, supervised tokens where the task has them."""
    from data.encode import EncoderConfig, build_encoder
    from training.models import ModelConfig, build

    enc = build_encoder(EncoderConfig(), build(ModelConfig(name=f"tiny_{family}", family=family)))
    cfg = _cfg(train_samples=4, samples_per_shard=4)
    for task, paths in shapes.ensure_cache(cfg, str(tmp_path)).items():
        for raw in _samples(paths):
            out = enc.encode({**raw, "source": f"shapes_{task}"})
            assert len(out) == (2 if task == "preference" else 1)
            supervised = sum(int((o["labels"] != -100).sum()) for o in out)
            assert (supervised == 0) == (task == "rl"), (task, raw["key"])
            if task == "video":
                assert "pixel_values_videos" in out[0] and int(out[0]["video_grid_thw"][0, 0]) >= 2
