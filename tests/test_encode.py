"""Encoder and loader: labels only where the record says, pad tokens expanded to the merged-patch count,
the HF model accepts the result, and the loader hands every rank distinct samples."""
import pytest
import torch

from data import shapes
from data.encode import IGNORE, Encoder
from data.loader import IndexedLoader, Layout
from training.models import FAMILIES, ModelConfig, build


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    return build(ModelConfig(family=request.param))


def _enc(bundle):
    return Encoder(bundle.tokenizer, bundle.image_processor)


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_chat_supervises_exactly_the_assistant_reply_and_im_end(bundle):
    rec = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many shapes?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]}
    _, media = shapes.sample(shapes.ShapesConfig(), 0)
    out = _enc(bundle).encode(rec, media)
    ids, labels = out["input_ids"], out["labels"]
    supervised = _text(bundle.tokenizer, ids[labels != IGNORE])
    assert supervised == "red<|im_end|>2<|im_end|>"
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()


def test_image_pads_match_the_merged_patch_count(bundle):
    rec, media = shapes.sample(shapes.ShapesConfig(tasks=["caption"]), 3)
    out = _enc(bundle).encode(rec, media)
    grid = out["image_grid_thw"]
    n_pad = int((out["input_ids"] == bundle.model.config.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 4 > 0
    assert out["pixel_values"].shape[0] == int(grid.prod())
    assert int((out["mm_token_type_ids"] == 1).sum()) == n_pad


def test_document_supervises_all_text_but_not_image_pads(bundle):
    rec, media = shapes.sample(shapes.ShapesConfig(tasks=["caption"]), 5)
    out = _enc(bundle).encode(rec, media)
    ids, labels = out["input_ids"], out["labels"]
    pads = ids == bundle.model.config.image_token_id
    assert (labels[pads] == IGNORE).all() and (labels[~pads] == ids[~pads]).all()
    assert _text(bundle.tokenizer, ids[~pads]).endswith(rec["content"][1]["text"] + "<|endoftext|>")


def test_missing_image_is_a_clear_error(bundle):
    rec = {"content": [{"type": "image", "image": "7.jpg"}, {"type": "text", "text": "x"}], "__key__": "s42"}
    with pytest.raises(ValueError, match="s42.*7.jpg"):
        _enc(bundle).encode(rec, {})


def test_model_runs_on_a_collated_micro_batch(bundle):
    lay = Layout(rank=0, world=1, micro_batch=3, grad_accum=1, seq_len=8192)
    loader = IndexedLoader(shapes.ShapesConfig(), _enc(bundle), lay, bundle.tokenizer.pad_token_id)
    (mb,) = loader.next_step()
    inputs = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                 "mm_token_type_ids")}
    logits = bundle.model(**inputs).logits
    assert logits.shape[:2] == mb["input_ids"].shape and torch.isfinite(logits).all()


def test_ranks_and_micro_batches_get_disjoint_consecutive_samples(bundle):
    seen = []
    for rank in range(2):
        lay = Layout(rank=rank, world=2, micro_batch=2, grad_accum=3, seq_len=8192)
        loader = IndexedLoader(shapes.ShapesConfig(), _enc(bundle), lay, bundle.tokenizer.pad_token_id)
        loader._encode = lambda i: {"input_ids": torch.tensor([i]), "labels": torch.tensor([i]),
                                    "mm_token_type_ids": torch.zeros(1, dtype=torch.long), "source": "s"}
        for _ in range(2):
            for mb in loader.next_step():
                seen += mb["input_ids"][:, 0].tolist()
        assert loader.state_dict()["next_index"] == 24
    assert sorted(seen) == list(range(24))


def test_loader_refuses_a_checkpoint_from_another_layout(bundle):
    lay = Layout(rank=0, world=1, micro_batch=2, grad_accum=1, seq_len=8192)
    loader = IndexedLoader(shapes.ShapesConfig(), _enc(bundle), lay, 0)
    with pytest.raises(ValueError, match="world=2"):
        loader.load_state_dict({"next_index": 8, "world": 2, "micro_batch": 2, "grad_accum": 1})


def test_shapes_samples_are_deterministic():
    cfg = shapes.ShapesConfig()
    (r1, m1), (r2, m2) = shapes.sample(cfg, 17), shapes.sample(cfg, 17)
    assert r1 == r2 and m1["0.png"].tobytes() == m2["0.png"].tobytes()
    assert shapes.sample(cfg, 18)[0] != r1
