"""Untrusted records: every record-level problem is a counted BadSample with a reason slug, never an exception that
stops the run (in the start-up probe or in a loader worker), and media/placeholder mismatches are counted too."""
import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from data import shapes
from data.encode import build_encoder, EncoderConfig
from data.errors import BadSample
from data.pipeline import DataConfig, Layout, Pipeline
from data.shards import write_tar
from data.video import write_mp4
from training.models import FAMILIES, ModelConfig, build


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    return build(ModelConfig(family=request.param))


def _png(w=60, h=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG, MP4 = _png(), write_mp4(np.full((4, 32, 32, 3), 128, np.uint8), 4)
Q, IMG, VID = {"type": "text", "text": "q"}, {"type": "image", "image": "0.png"}, {"type": "video", "video": "0.mp4"}
A = {"role": "assistant", "content": [{"type": "text", "text": "a"}]}


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _chat(*parts):
    return {"messages": [_user(*parts), A]}


def _box(**kw):
    return {"content": [IMG, {"type": "box", "box": [1, 2, 30, 20], "label": "red", **kw}]}


FRAMES = {"0.jpg": PNG, "1.jpg": PNG}
CRAFTED = [  # (what, record, media, reason)
    ("no known key", {"foo": 1}, {}, "unknown_record_shape"),
    ("empty object", {}, {}, "unknown_record_shape"),
    ("record is a list", [1, 2], {}, "unknown_record_shape"),
    ("messages a string", {"messages": "hi"}, {}, "bad_record"),
    ("messages empty", {"messages": []}, {}, "bad_record"),
    ("message an int", {"messages": [5]}, {}, "bad_record"),
    ("role an int", {"messages": [{"role": 1, "content": "x"}, A]}, {}, "bad_record"),
    ("role unknown", {"messages": [{"role": "gpt", "content": [IMG, Q]}, A]}, {"0.png": PNG}, "bad_record"),
    ("content an int", {"messages": [{"role": "user", "content": 5}, A]}, {}, "bad_record"),
    ("content an object", {"messages": [{"role": "user", "content": {"type": "text", "text": "x"}}, A]}, {},
     "bad_record"),
    ("assistant content an int", {"messages": [_user(Q), {"role": "assistant", "content": 5}]}, {}, "bad_record"),
    ("part an int", _chat(5), {}, "bad_record"),
    ("part a string", _chat("hello"), {}, "bad_record"),
    ("text an int", _chat({"type": "text", "text": 5}), {}, "bad_record"),
    ("text missing", _chat({"type": "text"}), {}, "bad_record"),
    ("assistant text a list", {"messages": [_user(Q), {"role": "assistant", "content": [
        {"type": "text", "text": ["a"]}]}]}, {}, "bad_record"),
    ("type a list", _chat({"type": ["image"], "image": "0.png"}), {"0.png": PNG}, "unknown_content_type"),
    ("image name a list", _chat({"type": "image", "image": ["0.png"]}), {"0.png": PNG}, "bad_record"),
    ("image name an object", _chat({"type": "image", "image": {"a": 1}}), {"0.png": PNG}, "bad_record"),
    ("image name an int", _chat({"type": "image", "image": 5}), {}, "bad_record"),
    ("video name nested list", _chat({"type": "video", "video": [["0.jpg"]]}), FRAMES, "bad_record"),
    ("video name an int", _chat({"type": "video", "video": 3}), {}, "bad_record"),
    ("video frame list empty", _chat({"type": "video", "video": []}), {}, "bad_record"),
    ("fps a string", _chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": "fast"}), FRAMES, "bad_record"),
    ("fps a list", _chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": [2]}), FRAMES, "bad_record"),
    ("fps zero", _chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": 0}), FRAMES, "bad_record"),
    ("fps negative", _chat({"type": "video", "video": "0.mp4", "fps": -1}), {"0.mp4": MP4}, "bad_record"),
    ("fps nan", _chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": math.nan}), FRAMES, "bad_record"),
    ("fps a bool", _chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": True}), FRAMES, "bad_record"),
    ("box label an int", _box(label=5), {"0.png": PNG}, "bad_record"),
    ("box label a list", _box(label=["red"]), {"0.png": PNG}, "bad_record"),
    ("box a string", _box(box="1234"), {"0.png": PNG}, "bad_record"),
    ("box of three", _box(box=[1, 2, 3]), {"0.png": PNG}, "bad_record"),
    ("box with nan", _box(box=[1, 2, 3, math.nan]), {"0.png": PNG}, "bad_record"),
    ("box with inf", _box(box=[1, 2, math.inf, 4]), {"0.png": PNG}, "bad_record"),
    ("box with a string", _box(box=[1, 2, "3", 4]), {"0.png": PNG}, "bad_record"),
    ("box an object", _box(box={"x1": 1}), {"0.png": PNG}, "bad_record"),
    ("box missing", {"content": [IMG, {"type": "box", "label": "red"}]}, {"0.png": PNG}, "bad_record"),
    ("box image a list", _box(image=["0.png"]), {"0.png": PNG}, "bad_record"),
    ("document content a string", {"content": "just text"}, {}, "bad_record"),
    ("document part an int", {"content": [Q, 5]}, {}, "bad_record"),
    ("document text None", {"content": [{"type": "text", "text": None}]}, {}, "bad_record"),
    ("chosen an int", {"messages": [_user(Q)], "chosen": 5, "rejected": A}, {}, "bad_record"),
    ("chosen a list of ints", {"messages": [_user(Q)], "chosen": [5], "rejected": A}, {}, "bad_record"),
    ("chosen content an int", {"messages": [_user(Q)], "chosen": {"role": "assistant", "content": 5},
                               "rejected": A}, {}, "bad_record"),
    ("rl messages an int", {"messages": 5, "answer": "2"}, {}, "bad_record"),
    # media and placeholders that do not match
    ("llava <image> in text", _chat({"type": "text", "text": "<image>\nWhat colour?"}), {"0.jpg": PNG},
     "llava_placeholder"),
    ("llava <image> in a string content", {"messages": [{"role": "user", "content": "<image>\nWhat?"}, A]},
     {"0.jpg": PNG}, "llava_placeholder"),
    ("llava <video> beside a converted image", _chat(IMG, {"type": "text", "text": "<video> and this?"}),
     {"0.png": PNG}, "llava_placeholder"),
    ("llava <image> in a document", {"content": [{"type": "text", "text": "<image> a red square"}]},
     {"0.png": PNG}, "llava_placeholder"),
    ("image member no part names", _chat(Q), {"0.jpg": PNG}, "unreferenced_media"),
    ("second image unreferenced", _chat(IMG, Q), {"0.png": PNG, "1.png": PNG}, "unreferenced_media"),
    ("document video unreferenced", {"content": [Q]}, {"0.mp4": MP4}, "unreferenced_media"),
]


def _raw(record, media, key="bad1"):
    return dict(key=key, source="src", record=record, media=dict(media))


@pytest.mark.parametrize("what,record,media,reason", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_each_crafted_record_is_a_bad_sample_with_its_reason(bundle, what, record, media, reason):
    with pytest.raises(BadSample) as e:
        build_encoder(EncoderConfig(), bundle).encode(_raw(record, media))
    assert (e.value.reason, e.value.key) == (reason, "bad1"), e.value


def test_the_details_name_the_fix(bundle):
    enc = build_encoder(EncoderConfig(), bundle)

    def detail(record, media):
        with pytest.raises(BadSample) as e:
            enc.encode(_raw(record, media))
        return e.value.detail

    assert "'foo'" in detail({"foo": 1}, {}) and "'messages'" in detail({"foo": 1}, {})
    d = detail(_chat({"type": "text", "text": "<image>\nWhat?"}), {"0.jpg": PNG})
    assert "python -m data.convert --format llava" in d
    d = detail(_chat(IMG, Q), {"0.png": PNG, "1.png": PNG, "2.mp4": MP4})
    assert "['1.png', '2.mp4']" in d and "0.png" not in d.split("[")[1]
    assert "label" in detail(_box(label=5), {"0.png": PNG})
    assert "fps" in detail(_chat({"type": "video", "video": "0.mp4", "fps": "x"}), {"0.mp4": MP4})


def test_placeholders_without_media_and_referenced_media_are_fine(bundle):
    """`<video>` in a text-only document (HTML, say) is just text; every member referenced is a normal sample;
    an image a box names is also an image part, which references it."""
    enc = build_encoder(EncoderConfig(), bundle)
    (out,) = enc.encode(_raw({"content": [{"type": "text", "text": "use <video> and <image> tags"}]}, {}))
    assert "<video>" in bundle.tokenizer.decode(out["input_ids"])
    assert enc.encode(_raw(_chat(IMG, VID, Q), {"0.png": PNG, "0.mp4": MP4}))
    assert enc.encode(_raw(_chat({"type": "video", "video": ["0.jpg", "1.jpg"], "fps": 2}, Q), FRAMES))
    assert enc.encode(_raw(_box(), {"0.png": PNG}))
    pref = {"messages": [_user(IMG, Q)], "chosen": A, "rejected": "b"}
    assert len(enc.encode(_raw(pref, {"0.png": PNG}))) == 2


def test_an_unforeseen_error_inside_the_encoder_is_still_a_bad_sample(bundle, monkeypatch):
    """The explicit checks give the reasons above; anything a record still trips deep inside is caught as
    "malformed_record" rather than ending the run (config errors stay ValueErrors)."""
    enc = build_encoder(EncoderConfig(), bundle)
    for exc in (KeyError("x"), TypeError("y"), AttributeError("z"), IndexError("i"), ValueError("v")):
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(enc, "_tokenize", boom)
        with pytest.raises(BadSample) as e:
            enc.encode(_raw(_chat(Q), {}))
        assert e.value.reason == "malformed_record" and type(exc).__name__ in e.value.detail


JUNK = [None, 0, -1, 1.5, math.nan, math.inf, True, "", "x", "0.png", "<image>", [], [1], ["0.png"], {}, {"a": 1},
        {"type": "text"}, {"type": "image", "image": "0.png"}, [{"type": "text", "text": 1}]]


def _mutate(node, rng):
    """A copy of the record with one node somewhere replaced by junk (or a key dropped from an object)."""
    if isinstance(node, dict) and node and rng.random() < 0.9:
        k = rng.choice(sorted(node))
        if rng.random() < 0.1:
            return {kk: v for kk, v in node.items() if kk != k}
        return {**node, k: _mutate(node[k], rng)}
    if isinstance(node, list) and node and rng.random() < 0.85:
        i = rng.randrange(len(node))
        return node[:i] + [_mutate(node[i], rng)] + node[i + 1:]
    return rng.choice(JUNK)


def test_fuzzed_records_never_raise_anything_but_bad_sample(bundle):
    """Random one-node mutations of a record with every part type: the encoder encodes them or raises BadSample,
    and explicit checks (not the catch-all) name the reason of each."""
    base = {"messages": [{"role": "system", "content": "be brief"},
                         _user(IMG, {"type": "video", "video": ["0.jpg", "1.jpg"], "fps": 2}, VID, Q),
                         {"role": "assistant", "content": [{"type": "text", "text": "here: "},
                                                           {"type": "box", "box": [1, 2, 30, 20], "label": "red"}]}]}
    media = {"0.png": PNG, "0.mp4": MP4, **FRAMES}
    enc = build_encoder(EncoderConfig(), bundle)
    assert enc.encode(_raw(base, media))
    rng, reasons = random.Random(0), {}
    for i in range(1000):
        rec = _mutate(base, rng)
        try:
            enc.encode(_raw(rec, media, key=f"f{i}"))
            reasons["ok"] = reasons.get("ok", 0) + 1
        except BadSample as e:
            assert e.key == f"f{i}"
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
    assert reasons.get("ok", 0) >= 1 and reasons.get("bad_record", 0) > 50 and len(reasons) >= 5, reasons
    assert "malformed_record" not in reasons, reasons


# ---------------------------------------------------------------- a whole run over shards with bad records


def _shard(path, n=40, bad=None):
    """n shapes caption samples; `bad` maps an index to the record (and media) that replaces that sample."""
    samples = []
    for i in range(n):
        record, media = shapes.generate(shapes.ShapesConfig(), "caption", i)
        record, media = (bad or {}).get(i, (record, media))
        samples.append((f"s{i:03d}", {"json": json.dumps(record).encode(), **media}))
    write_tar(str(path), samples)
    return str(path)


BAD_AT = {5: ({"foo": 1}, {}),  # inside the start-up probe's window (the first 16 samples)
          30: ({"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, A]}, {"0.jpg": PNG}),
          33: ({"bar": [1]}, {})}  # after it: met only by the loader (a worker process in the stage run)


def test_bad_records_in_shards_are_counted_by_the_pipeline(tmp_path):
    b = build(ModelConfig(name="tiny_qwen2_5_vl", family="qwen2_5_vl"))
    path = _shard(tmp_path / "d-0.tar", n=100, bad=BAD_AT)  # more than one step reads: no second epoch
    cfg = DataConfig(name="shards", sources=[{"name": "web", "urls": path, "shuffle_shards": False}],
                     max_bad_fraction=0.5, pack_buffer=4)
    p = Pipeline(cfg, {}, b, Layout(rank=0, world=1, micro_batch=2, grad_accum=8, seq_len=256))
    keys = [m["key"] for mb in p.next_step() for m in mb["meta"]]
    assert not {"s005", "s030", "s033"} & set(keys) and max(keys) > "s033", keys
    assert p.metrics() == {"skipped/web/unknown_record_shape": 2, "skipped/web/llava_placeholder": 1, "epoch/web": 0}


def test_a_stage_over_shards_with_bad_records_finishes_and_logs_the_counts_in_metrics_rows(tmp_path):
    """The bad record inside the probe window used to stop the start-up probe with a ValueError (and the one after
    it a loader worker); now both are counted: `skipped/web/<reason>` in metrics.jsonl and DONE."""
    from tests.conftest import metrics_rows, run_stage

    shard = _shard(tmp_path / "d-0.tar", bad=BAD_AT)
    out = tmp_path / "run"
    run_stage(out, ["trainer.max_steps=2", "data=shards", f"data.sources=[{{name: web, urls: '{shard}'}}]",
                    "data.max_bad_fraction=0.5", "data.num_workers=2", "trainer.micro_batch_size=1"])
    assert (out / "DONE").exists()
    last = metrics_rows(out)[-1]
    assert last["skipped/web/unknown_record_shape"] >= 1 and last["skipped/web/llava_placeholder"] >= 1, last


def test_data_level_limits_reach_the_sources_and_the_encoder(tmp_path):
    """data.max_member_bytes and data.max_video_frames, set on DataConfig, are what the chain's shard readers and
    encoder apply (a source's own max_member_bytes would win over the data-level one)."""
    from tests.test_video import _frames

    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    big_png, video = buf.getvalue(), write_mp4(_frames(30, 32, 32), 10)
    assert len(big_png) > 200_000
    bad = {3: (_chat(VID, Q), {"0.mp4": video}), 7: ({"content": [IMG, Q]}, {"0.png": big_png})}
    path = _shard(tmp_path / "d-0.tar", n=100, bad=bad)
    b = build(ModelConfig(name="tiny_qwen2_5_vl", family="qwen2_5_vl"))
    for limits, want in (({}, {}), ({"max_member_bytes": 100_000, "max_video_frames": 20},
                                    {"skipped/web/member_too_large": 1, "skipped/web/video_too_long": 1})):
        cfg = DataConfig(name="shards", sources=[{"name": "web", "urls": path}], max_bad_fraction=0.5, pack_buffer=4,
                         **limits)
        p = Pipeline(cfg, {}, b, Layout(rank=0, world=1, micro_batch=2, grad_accum=8, seq_len=1024))
        keys = [m["key"] for mb in p.next_step() for m in mb["meta"]]
        assert max(keys) > "s007" and p.metrics() == {**want, "epoch/web": 0}, (keys, p.metrics())
