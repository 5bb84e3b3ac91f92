"""data/pack.py: the packed micro-batch through the real HF model gives each sample the loss it has alone
(all three families; text, image and video samples mixed), plus first-fit, groups, overlong policies,
the collate contract and exact restore of the packer state."""
import io
import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data import shapes
from data.encode import IGNORE, EncoderConfig, build_encoder
from data.pack import (FirstFit, PackConfig, Packer, block_causal_mask, collate, fill_ratio, packed_position_ids,
                       padded_fill, raw_from_json, raw_to_json, varlen_inputs)
from data.rope import RopeSpec, attach, token_types
from training.models import FAMILIES, ModelConfig, build

# ---------------------------------------------------------------- samples for the model test


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    b = build(ModelConfig(name=f"tiny_{request.param}", family=request.param))
    b.model.eval()
    return b


def _words(tok, text):
    return tok.encode(text, add_special_tokens=False)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_raw(bundle, raw: dict) -> list[dict]:
    """The pipeline's encode step: data/encode.py's Encoder, then data/rope.py's position ids."""
    spec = RopeSpec.from_config(bundle.model.config)
    return [attach(spec, s) for s in build_encoder(EncoderConfig(), bundle).encode(raw)]


def image_sample(bundle, index: int) -> dict:
    """A shapes record (caption document or VQA chat) through the current Encoder."""
    record, media = shapes.sample(shapes.ShapesConfig(), index)
    raw = {"key": f"img{index}", "source": "shapes", "record": record,
           "media": {k: png_bytes(v) for k, v in media.items()}}
    (s,) = encode_raw(bundle, raw)
    return s


def text_sample(bundle, index: int) -> dict:
    record = {"content": [{"type": "text", "text": f"document {index}: " + "lorem ipsum dolor " * (index % 3 + 1)}]}
    (s,) = encode_raw(bundle, {"key": f"txt{index}", "source": "text", "record": record, "media": {}})
    return s


def video_sample(bundle, index: int, t: int = 2, h: int = 4, w: int = 6) -> dict:
    """Built directly (no video reader): random patches of the right shape, the right pad counts, and for
    Qwen3-VL the processor's per-temporal-patch `<x.x seconds>` text before each frame block."""
    cfg, tok = bundle.model.config, bundle.tokenizer
    spec = RopeSpec.from_config(cfg)
    p = bundle.family.patch_size
    g = torch.Generator().manual_seed(index)
    per_frame = h * w // spec.spatial_merge_size ** 2
    seconds = 2 / (1.0 + index % 3)  # temporal_patch_size / fps
    ids = _words(tok, f"clip {index} shows")
    if spec.family == "qwen3_vl":
        for f in range(t):
            ids += _words(tok, f"<{(f + 0.5) * seconds:.1f} seconds>")
            ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * per_frame + [cfg.vision_end_token_id]
    else:
        ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (t * per_frame) + [cfg.vision_end_token_id]
    ids += _words(tok, " a moving shape") + [tok.convert_tokens_to_ids("<|endoftext|>")]
    ids = torch.tensor(ids)
    labels = torch.where(ids == cfg.video_token_id, IGNORE, ids)
    s = dict(input_ids=ids, labels=labels, mm_token_type_ids=token_types(spec, ids), key=f"vid{index}",
             source="video", pixel_values_videos=torch.randn(t * h * w, 3 * 2 * p * p, generator=g),
             video_grid_thw=torch.tensor([[t, h, w]]))
    if spec.family == "qwen2_5_vl":
        s["second_per_grid_ts"] = torch.tensor([seconds])
    return attach(spec, s)


def _model_inputs(bundle, batch: dict) -> dict:
    keys = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]
    if bundle.family.name == "qwen2_5_vl":
        keys.append("second_per_grid_ts")
    return {k: batch[k] for k in keys if k in batch}


def _ce(logits, labels):
    """Per-position CE of the shifted targets (0 where unsupervised)."""
    target = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                           reduction="none").view_as(target)


def alone_loss(bundle, s: dict) -> float:
    """The sample by itself, HF computing its own positions (no position_ids, no mask)."""
    inputs = _model_inputs(bundle, s)
    with torch.no_grad():
        logits = bundle.model(input_ids=s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None],
                              **inputs).logits
    return float(_ce(logits, s["labels"][None]).sum())


def packed_losses(bundle, batch: dict, **override) -> torch.Tensor:
    """Per-sample loss sums of a packed micro-batch, attributed by the target token's sample id."""
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
              **_model_inputs(bundle, batch))
    kw.update(override)
    with torch.no_grad():
        logits = bundle.model(**kw).logits
    labels = kw.get("labels", batch["labels"]).view(logits.shape[:2])
    ce = _ce(logits, labels)
    sid = batch["sample_ids"].view(logits.shape[:2])[:, 1:]
    return torch.zeros(len(batch["meta"])).index_add_(0, sid[sid >= 0], ce[sid >= 0])


@pytest.fixture(scope="module")
def packed(bundle):
    samples = []
    for i in range(3):
        samples += [image_sample(bundle, i), text_sample(bundle, i), video_sample(bundle, i, t=1 + i % 2)]
    longest = max(len(s["input_ids"]) for s in samples)
    cfg = PackConfig(seq_len=longest + 24, buffer_size=4, pad_id=bundle.tokenizer.pad_token_id)
    packer = cfg.build()
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    return samples, rows, cfg, collate(rows, cfg)


def test_packed_loss_equals_each_sample_alone(bundle, packed):
    samples, rows, cfg, batch = packed
    assert len(rows) >= 2 and max(len(r) for r in rows) >= 2
    kinds = {s["key"][:3] for r in rows if len(r) >= 2 for s in r}
    assert {"img", "txt", "vid"} <= kinds, "some row must mix samples of every kind"
    by_key = {s["key"]: s for s in samples}
    alone = torch.tensor([alone_loss(bundle, by_key[m["key"]]) for m in batch["meta"]])
    ours = packed_losses(bundle, batch)
    assert torch.allclose(ours, alone, rtol=1e-5, atol=1e-4), (ours - alone).abs().max()
    # the token-weighted sum: the packed micro-batch's whole loss sum
    assert abs(float(ours.sum()) - float(alone.sum())) <= 1e-5 * float(alone.sum())
    # and the supervised-target counts agree with each sample's own
    for i, m in enumerate(batch["meta"]):
        n = int((by_key[m["key"]]["labels"][1:] != IGNORE).sum())
        assert int(batch["sample_sup"][batch["sample_ids"] == i][0]) == n


def test_without_the_block_mask_samples_leak(bundle, packed):
    """Negative control: position ids alone do not isolate samples (so the test above can fail)."""
    samples, rows, cfg, batch = packed
    by_key = {s["key"]: s for s in samples}
    alone = torch.tensor([alone_loss(bundle, by_key[m["key"]]) for m in batch["meta"]])
    leaky = packed_losses(bundle, batch, attention_mask=None)
    assert (leaky - alone).abs().max() > 1e-2


def test_varlen_flattening_keeps_the_losses(bundle, packed):
    """The GPU path's inputs: rows flattened to [1, B*L], boundaries only in cu_seq_lens. Here SDPA gets the
    mask rebuilt from those cu_seq_lens (flash-attention itself is GPU-only)."""
    samples, rows, cfg, batch = packed
    B, L = batch["input_ids"].shape
    kw = varlen_inputs(batch)
    assert kw["position_ids"].shape == (4, 1, B * L) and kw["cu_seq_lens_q"].dtype == torch.int32
    reference = packed_losses(bundle, batch)
    mask = block_causal_mask(kw["cu_seq_lens_q"], 1, B * L)
    assert torch.allclose(packed_losses(bundle, batch, **kw, attention_mask=mask), reference, rtol=1e-5, atol=1e-4)
    # no mask at all: HF must find the same boundaries from the flattened text row
    assert torch.allclose(packed_losses(bundle, batch, **kw, attention_mask=None), reference, rtol=1e-5, atol=1e-4)


def test_sdpa_varlen_through_the_trainer_forward_equals_each_sample_alone(bundle, packed):
    """attn_implementation="sdpa_varlen" (training/attention.py): the trainer's step (training/vlm.py) on
    the varlen collate (no 4D mask) gives each sample's loss alone, for all families with images, videos and text
    mixed in rows; the ViT (per-image SDPA chunks) and a padded generation-style batch match plain "sdpa"."""
    from data.pack import collate
    from training.vlm import VLM

    samples, rows, cfg, _ = packed
    batch = collate(rows, PackConfig(seq_len=cfg.seq_len, buffer_size=4, pad_id=cfg.pad_id, attention="varlen"))
    assert "attention_mask" not in batch
    model = bundle.model
    by_key = {s["key"]: s for s in samples}
    alone = torch.tensor([alone_loss(bundle, by_key[m["key"]]) for m in batch["meta"]])
    model.config._attn_implementation = "sdpa_varlen"
    try:
        with torch.no_grad():
            ce, _ = VLM(model)(batch, nll=True)
            sid = batch["sample_ids"][:, 1:]
            ours = torch.zeros(len(batch["meta"])).index_add_(0, sid[sid >= 0], ce[sid >= 0])
            s = image_sample(bundle, 5)
            varlen_alone = alone_loss(bundle, s)  # no cu_seq_lens: the plain SDPA path with HF's mask
    finally:
        model.config._attn_implementation = "sdpa"
    assert torch.allclose(ours, alone, rtol=1e-5, atol=1e-4), (ours - alone).abs().max()
    assert abs(varlen_alone - alone_loss(bundle, s)) <= 1e-5 * abs(varlen_alone)


def _on(x: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: packed rows through sdpa_varlen (fp32) and "
                    "flash_attention_2 (bf16) on CUDA; the CPU tests above cover sdpa_varlen on CPU")
@pytest.mark.parametrize("impl", ["sdpa_varlen", "flash_attention_2"])
def test_packed_rows_on_gpu_give_each_sample_its_loss_alone(bundle, packed, impl):
    """The GPU attention paths of the trainer's forward on the varlen collate: each sample's loss equals its loss
    alone through the same implementation (fp32 for sdpa_varlen; flash-attention needs bf16, hence the looser
    tolerance)."""
    import copy

    from training.vlm import VLM

    if impl == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    dtype = torch.float32 if impl == "sdpa_varlen" else torch.bfloat16
    samples, rows, cfg, _ = packed
    batch = _on(collate(rows, PackConfig(seq_len=cfg.seq_len, buffer_size=4, pad_id=cfg.pad_id, attention="varlen")),
                "cuda")
    model = copy.deepcopy(bundle.model).to("cuda", dtype)
    model.config._attn_implementation = impl
    for sub in ("text_config", "vision_config"):
        if hasattr(model.config, sub):
            getattr(model.config, sub)._attn_implementation = impl
    by_key = {s["key"]: s for s in samples}
    with torch.no_grad():
        ce, _ = VLM(model)(batch, nll=True)
        sid = batch["sample_ids"][:, 1:]
        ours = torch.zeros(len(batch["meta"]), device="cuda").index_add_(0, sid[sid >= 0], ce[sid >= 0]).cpu()
        alone = []
        for m in batch["meta"]:
            s = _on(by_key[m["key"]], "cuda")
            logits = model(input_ids=s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None],
                           **_model_inputs(bundle, s)).logits
            alone.append(float(_ce(logits, s["labels"][None]).sum()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(ours, torch.tensor(alone), rtol=tol, atol=10 * tol), (ours - torch.tensor(alone)).abs().max()


def test_sdpa_varlen_segments_ignore_the_padding_of_longer_segments():
    """The segment gather pads short segments to the longest of their length class; outputs and gradients at real
    positions equal dense block-causal SDPA (GQA heads included), so the padding never leaks in either direction.
    Lengths 3, 7, 1, 8, 0, 5, 2, 16, 9, 6: five classes, most with padding, an empty segment, out of order."""
    from training.attention import sdpa_varlen_forward

    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 10, 11, 19, 19, 24, 26, 42, 51, 57], dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(1, 4, T, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, T, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, T, 8, generator=g, requires_grad=True)
    module = torch.nn.Module()
    out, _ = sdpa_varlen_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    mask = block_causal_mask(cu, 1, T)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                          scale=0.3).transpose(1, 2)
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-6)
    w = torch.randn(want.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_sdpa_varlen_pads_each_segment_only_within_its_length_class():
    """Every real position is gathered exactly once, and a segment is padded at most to twice its length (the
    longest of its power-of-two class), not to the longest of the micro-batch: attention work stays within 4x
    sum(n_i^2) on mixed lengths."""
    from training.attention import _length_classes

    lengths = torch.tensor([3, 7, 1, 8, 0, 5, 2, 16, 9, 6, 200, 130, 12])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    groups = _length_classes(cu, "cpu")
    seen = torch.cat([index[valid] for index, valid in groups])
    assert torch.equal(seen.sort().values, torch.arange(int(cu[-1])))
    for index, valid in groups:
        n = valid.sum(1)
        assert int(n.min()) > 0 and index.shape[1] == int(n.max()) < 2 * int(n.min())
    assert sum(v.shape[0] * v.shape[1] ** 2 for _, v in groups) <= 4 * int((lengths ** 2).sum())


def test_hf_native_four_row_positions_isolate_only_without_cache(bundle, packed):
    """HF 5.23 builds the packed mask from a text row itself, but only with use_cache=False; pinned here so a
    transformers upgrade that changes it is noticed (the trainer passes the 4D mask, not this)."""
    samples, rows, cfg, batch = packed
    by_key = {s["key"]: s for s in samples}
    alone = torch.tensor([alone_loss(bundle, by_key[m["key"]]) for m in batch["meta"]])
    pos4 = packed_position_ids(batch)
    native = packed_losses(bundle, batch, attention_mask=None, position_ids=pos4, use_cache=False)
    assert torch.allclose(native, alone, rtol=1e-5, atol=1e-4)
    cached = packed_losses(bundle, batch, attention_mask=None, position_ids=pos4, use_cache=True)
    assert (cached - alone).abs().max() > 1e-2


# ---------------------------------------------------------------- packer logic on synthetic samples


def fake(n: int, key: str = "s", group=None, source: str = "src", media: bool = False, sup: bool = True) -> dict:
    ids = torch.arange(100, 100 + n)
    s = dict(input_ids=ids, labels=ids.clone() if sup else torch.full((n,), IGNORE),
             mm_token_type_ids=torch.zeros(n, dtype=torch.long), position_ids=torch.arange(n).expand(3, n),
             key=key, source=source, group=group)
    if media:
        s["mm_token_type_ids"][1:3] = 1
        s["image_grid_thw"] = torch.tensor([[1, 2, 4]])
        s["pixel_values"] = torch.zeros(8, 4)
    return s


def keys(rows):
    return [[s["key"] for s in r] for r in rows]


def test_first_fit_places_into_the_first_row_with_room():
    fit = FirstFit(capacity=10, buffer_size=100)
    for name, n in [("a", 6), ("b", 6), ("c", 3), ("d", 3), ("e", 1)]:
        assert fit.add(name, n) == ([["a", "c", "e"]] if name == "e" else [])
    assert fit.rows == [["b", "d"]]  # a+c+e filled row 0 exactly and left at once
    assert fit.flush() == [["b", "d"]] and fit.rows == []


def test_buffer_bound_emits_the_fullest_row():
    fit = FirstFit(capacity=10, buffer_size=3)
    out = [r for item, n in [("a", 7), ("b", 8), ("c", 9), ("d", 5)] for r in fit.add(item, n)]
    assert out == [["c"]] and fit.held == 3  # 4 held > 3: the fullest (9) leaves


def test_groups_stay_in_one_row():
    packer = PackConfig(seq_len=10, buffer_size=100).build()
    rows = packer.add(fake(5, "x"))
    rows += packer.add([fake(3, "chosen", group=7), fake(3, "rejected", group=7)])  # does not fit next to x
    rows += packer.add(fake(4, "y")) + packer.flush()
    assert keys(rows) == [["x", "y"], ["chosen", "rejected"]]


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_policies_are_counted_never_a_crash(policy):
    packer, rows = PackConfig(seq_len=8, overlong=policy).build(), []
    for unit in [fake(20, "long_text"), fake(20, "long_img", media=True), [fake(5, "c", 1), fake(5, "r", 1)],
                 fake(20, "long_unsup", sup=False), fake(0, "empty"), fake(3, "ok")]:
        rows += packer.add(unit)
    rows += packer.flush()
    dropped = packer.stats["dropped"]["src"]
    if policy == "drop":
        assert keys(rows) == [["ok"]]
        assert dropped == {"too_long": 5, "empty": 1}
    else:
        assert keys(rows) == [["long_text"], ["long_unsup"], ["ok"]]
        assert len(rows[0][0]["input_ids"]) == 8 and rows[0][0]["position_ids"].shape == (3, 8)
        assert dropped == {"too_long_media": 1, "too_long_group": 2, "empty": 1}
        assert packer.stats["truncated"]["src"] == {"too_long": 2}


def test_truncation_that_leaves_no_labels_drops():
    packer = PackConfig(seq_len=8, overlong="truncate").build()
    s = fake(20, "late_reply")
    s["labels"][:15] = IGNORE
    assert packer.add(s) == [] and packer.flush() == []
    assert packer.stats["dropped"]["src"] == {"too_long_no_labels_left": 1}


def test_missing_position_ids_is_a_clear_error():
    s = fake(4, "nopos")
    del s["position_ids"]
    with pytest.raises(ValueError, match="nopos.*position_ids"):
        Packer(PackConfig(seq_len=8)).add(s)


def test_collate_contract():
    cfg = PackConfig(seq_len=10, pad_id=0)
    a, b, c = fake(4, "a", source="A"), fake(6, "b", source="B", media=True), fake(3, "c", source="C", media=True)
    c["kind"], c["answer"], c["reward"] = "prompt", "4", "math"
    batch = collate([[a, b], [c]], cfg)
    assert batch["input_ids"].shape == (2, 10) and batch["position_ids"].shape == (3, 2, 10)
    assert batch["attention_mask"].shape == (2, 1, 10, 10) and batch["attention_mask"].dtype == torch.bool
    assert batch["sample_ids"].tolist() == [[0] * 4 + [1] * 6, [2] * 3 + [-1] * 7]
    assert batch["labels"][0, 0] == IGNORE and batch["labels"][0, 4] == IGNORE  # each sample's first token
    assert batch["sample_sup"][0].tolist() == [3] * 4 + [5] * 6
    assert batch["position_ids"][0, 1].tolist() == [0, 1, 2] + list(range(7))  # padding: own segment
    m = batch["attention_mask"][0, 0]
    assert m[5, 4] and not m[4, 3 + 2] and not m[5, 3] and m[3, 0]  # causal in a sample, blocked across
    assert batch["cu_seqlens"].tolist() == [0, 4, 10, 13, 20] and batch["max_seqlen"] == 7
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4]] and batch["pixel_values"].shape == (16, 4)
    assert batch["sources"] == ["A", "B", "C"]
    assert batch["meta"][2] == {"key": "c", "source": "C", "group": None, "kind": "prompt", "answer": "4",
                                "reward": "math"}
    assert "attention_mask" not in collate([[a]], PackConfig(seq_len=10, attention="varlen"))


def test_fill_ratio_helpers():
    assert fill_ratio([5, 5, 5, 5], 10) == 1.0
    assert fill_ratio([6, 6], 10) == 0.6
    assert fill_ratio([11, 5], 10) == 0.5  # the overlong one is dropped
    assert padded_fill([2, 8, 5, 5], batch_size=2) == 20 / 26
    rng = random.Random(0)
    mix = [rng.choice([rng.randint(20, 300), rng.randint(300, 1500), rng.randint(1500, 6000)]) for _ in range(2000)]
    assert fill_ratio(mix, 8192, buffer_size=64) > 0.98 > padded_fill(mix, 4)


# ---------------------------------------------------------------- state: exact restore


def png(colour) -> bytes:
    return png_bytes(Image.new("RGB", (40 + 8 * colour[0] % 50, 48), colour))


def raw_stream(n: int):
    for i in range(n):
        if i % 3 == 0:
            record = {"content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": f"shape {i}"}]}
            media = {"0.png": png((i * 37 % 255, 90, 200))}
        else:
            record = {"content": [{"type": "text", "text": f"doc {i} " + "word " * (i % 7)}]}
            media = {}
        yield {"key": f"k{i}", "source": "mix", "record": record, "media": media}


@pytest.fixture(scope="module")
def qwen2_bundle():
    return build(ModelConfig(name="tiny_qwen2_vl", family="qwen2_vl"))


def make_encode(bundle):
    return lambda raw: encode_raw(bundle, raw)


def test_restore_is_exact(qwen2_bundle):
    encode = make_encode(qwen2_bundle)
    cfg = PackConfig(seq_len=96, buffer_size=6, overlong="truncate", pad_id=0)

    def run(packer, raws):
        return [r for raw in raws for r in packer.add(encode(raw))]

    raws = list(raw_stream(40))
    straight = cfg.build()
    expected = run(straight, raws) + straight.flush()
    first = cfg.build()
    head = run(first, raws[:17])
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state["rows"] and any(e["raw"]["media"] for r in state["rows"] for e in r)
    second = cfg.build()
    second.load_state_dict(state, encode)
    got = head + run(second, raws[17:]) + second.flush()
    assert keys(got) == keys(expected)
    a, b = collate(got[:5], cfg), collate(expected[:5], cfg)
    for k in ("input_ids", "labels", "position_ids", "pixel_values", "image_grid_thw", "attention_mask"):
        assert torch.equal(a[k], b[k]), k
    assert second.stats == straight.stats


def test_restore_refuses_other_seq_len_and_changed_encoder(qwen2_bundle):
    encode = make_encode(qwen2_bundle)
    p = PackConfig(seq_len=96, buffer_size=50).build()
    for raw in raw_stream(3):
        p.add(encode(raw))
    state = p.state_dict()
    with pytest.raises(ValueError, match="seq_len=96"):
        PackConfig(seq_len=64, buffer_size=50).build().load_state_dict(state, encode)
    with pytest.raises(ValueError, match="buffer_size=50"):
        PackConfig(seq_len=96, buffer_size=8).build().load_state_dict(state, encode)

    def longer(raw):
        return [dict(s, input_ids=torch.cat([s["input_ids"], s["input_ids"][:1]])) for s in encode(raw)]
    with pytest.raises(ValueError, match="encoder or its config changed"):
        PackConfig(seq_len=96, buffer_size=50).build().load_state_dict(state, longer)


def test_raw_json_roundtrip_and_non_bytes_media():
    raw = {"key": "k", "source": "s", "record": {"content": []}, "media": {"0.jpg": b"\xff\xd8\x00"}}
    assert raw_from_json(json.loads(json.dumps(raw_to_json(raw)))) == raw
    with pytest.raises(ValueError, match="not bytes"):
        raw_to_json(dict(raw, media={"0.jpg": Image.new("RGB", (2, 2))}))
