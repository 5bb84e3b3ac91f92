"""The whole data chain as the trainer uses it: shapes cache or shards -> mixture -> encode -> rope -> pack."""
import json

import pytest
import torch

from data import shapes
from data.pipeline import DataConfig, Layout, Pipeline
from data.shards import write_tar
from training.vlm import VLM
from training.models import ModelConfig, build


@pytest.fixture(scope="module")
def bundle():
    return build(ModelConfig(name="tiny_qwen2_5_vl", family="qwen2_5_vl"))


def _pipe(bundle, rank=0, world=1, workers=0, mixture=None, cfg=None, ga=2):
    cfg = cfg or DataConfig(num_workers=workers, pack_buffer=8)
    if cfg.name == "shapes":
        cfg.shapes.tasks = ["caption", "vqa", "video", "text", "grounding"]
    return Pipeline(cfg, mixture or {}, bundle, Layout(rank=rank, world=world, micro_batch=2, grad_accum=ga,
                                                         seq_len=256))


def _keys(step):
    return [m["key"] for mb in step for m in mb["meta"]]


def test_micro_batches_run_through_the_model(bundle):
    step = _pipe(bundle).next_step()
    assert len(step) == 2
    mb = step[0]
    # the model configs default to sdpa_varlen: segments by cu_seqlens, no 4D mask
    assert mb["input_ids"].shape == (2, 256) and "attention_mask" not in mb and int(mb["cu_seqlens"][-1]) == 512
    assert len(mb["sources"]) == int(mb["sample_ids"].max()) + 1
    logps, _ = VLM(bundle.model)(mb)
    assert logps.shape == (2, 255) and torch.isfinite(logps).all() and (logps <= 0).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_and_does_not_replay(bundle, workers):
    ref = _pipe(bundle, workers=workers)
    steps = [ref.next_step() for _ in range(5)]
    p = _pipe(bundle, workers=workers)
    for _ in range(2):
        p.next_step()
    state = json.loads(json.dumps(p.state_dict()))  # it goes through the JSON checkpoint file
    resumed = _pipe(bundle, workers=workers)
    resumed.load_state_dict(state)
    for want in steps[2:]:
        got = resumed.next_step()
        assert _keys(got) == _keys(want)
        for a, b in zip(got, want):
            for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(a[k], b[k]), k
            if "pixel_values" in b:
                assert torch.equal(a["pixel_values"], b["pixel_values"])
    # the saved state holds positions and the packer's few buffered samples, not the consumed ones
    assert len(json.dumps(state)) < 2_000_000


def test_ranks_see_different_samples_and_state_refuses_other_layouts(bundle):
    k0 = _keys(_pipe(bundle, rank=0, world=2).next_step())
    k1 = _keys(_pipe(bundle, rank=1, world=2).next_step())
    assert k0 and k1 and not set(k0) & set(k1)
    state = _pipe(bundle, rank=0, world=2).state_dict()
    with pytest.raises(ValueError, match="data-parallel size=2 but this run has 1"):
        _pipe(bundle).load_state_dict(state)
    with pytest.raises(ValueError, match="data.num_workers"):
        _pipe(bundle, workers=2).load_state_dict(_pipe(bundle).state_dict())


def test_a_seq_len_that_drops_every_sample_stops_with_the_counts_not_a_silent_spin(bundle):
    """Samples too long for seq_len are dropped and counted (not bad data, so max_bad_fraction does not judge
    them); when none of the last data.max_skips_in_row samples was packed, the loader stops with an error."""
    cfg = DataConfig(pack_buffer=8, max_skips_in_row=50)
    cfg.shapes.tasks = ["caption", "vqa"]  # 20 to 40 tokens each: none fits 16
    p = Pipeline(cfg, {}, bundle, Layout(rank=0, world=1, micro_batch=2, grad_accum=1, seq_len=16))
    with pytest.raises(RuntimeError, match=r"last 50 samples pulled were all skipped or dropped, none packed "
                                           r"\(seq_len 16.*dropped/(caption|vqa)/too_long: \d+.*stage.seq_len"):
        p.next_step()
    ok = Pipeline(cfg, {}, bundle, Layout(rank=0, world=1, micro_batch=2, grad_accum=1, seq_len=256))
    assert ok.next_step()  # the same limit with a seq_len that fits


def test_stage_mixture_selects_and_weights_sources(bundle):
    p = _pipe(bundle, mixture={"text": 3, "caption": 1}, ga=8)
    sources = [s for mb in p.next_step() for s in mb["sources"]]
    assert set(sources) <= {"text", "caption"} and sources.count("text") > sources.count("caption")
    with pytest.raises(ValueError, match="stage.mixture names"):
        _pipe(bundle, mixture={"nope": 1})


def test_bad_samples_in_shards_are_skipped_and_counted(bundle, tmp_path):
    good = []
    for i in range(100):  # more than one step reads: no second epoch
        record, media = shapes.generate(shapes.ShapesConfig(), "caption", i)
        good.append({"key": f"s{i:03d}", "record": record, "media": media})
    for i in (3, 11, 25):  # undecodable image bytes
        good[i]["media"] = {"0.png": b"not a png"}
    write_tar(str(tmp_path / "d-0.tar"), [(g["key"], {"json": json.dumps(g["record"]).encode(),
                                                      **{f"{k}": v for k, v in g["media"].items()}})
                                          for g in good])
    cfg = DataConfig(name="shards", sources=[{"name": "web", "urls": str(tmp_path / "d-0.tar")}],
                     max_bad_fraction=0.5, pack_buffer=4)
    p = _pipe(bundle, cfg=cfg, ga=6)
    keys = _keys(p.next_step())
    assert not {"s003", "s011", "s025"} & set(keys) and len(keys) > 10
    assert p.metrics() == {"skipped/web/undecodable_image": 3, "epoch/web": 0}
