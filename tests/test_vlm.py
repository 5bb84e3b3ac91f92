"""The explicit model step (training/vlm.py) against the HF model's own forward with full logits: same loss, same
gradients, for every family on packed rows that mix images, videos and text, with the loss cut into chunks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.encode import IGNORE
from data.pack import PackConfig, collate, varlen_inputs
from test_packing import image_sample, text_sample, video_sample
from training.models import FAMILIES, ModelConfig, build
from training.vlm import VLM


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request):
    b = build(ModelConfig(name=f"tiny_{request.param}", family=request.param))
    samples = []
    for i in range(2):
        samples += [image_sample(b, i), text_sample(b, i), video_sample(b, i, t=1 + i % 2)]
    cfg = PackConfig(seq_len=max(len(s["input_ids"]) for s in samples) + 24, buffer_size=4,
                     pad_id=b.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    batch = collate(rows, cfg)
    assert "pixel_values" in batch and "pixel_values_videos" in batch and batch["input_ids"].shape[0] >= 2
    return b, batch


def _weights(batch):
    g = torch.Generator().manual_seed(0)
    return (batch["labels"][:, 1:] != IGNORE).float() * torch.rand(batch["labels"][:, 1:].shape, generator=g)


def _hf_full_logits(model, batch) -> torch.Tensor:
    """The HF model's own forward (ViT inside, its merge) on the varlen inputs: [B, L, V] logits."""
    B, L = batch["input_ids"].shape
    inputs = varlen_inputs(batch, model.config._attn_implementation)
    inputs.pop("use_cache")
    return model(**inputs, use_cache=False).logits.view(B, L, -1).float()


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for n in ref:
        err, scale = float((ours[n] - ref[n]).norm()), float(ref[n].norm())
        assert err <= 1e-5 * scale + 1e-8, (n, err, scale)


@pytest.mark.parametrize("path", ["fused", "recomputed"])
def test_chunked_loss_and_gradients_equal_the_full_logits_forward(case, path):
    """Σ w·CE from 5-token lm_head chunks == HF's full [B, L, V] logits, loss and every gradient: the lm objective's
    path (gradients computed per chunk in the forward) and the log-prob path (chunks recomputed in backward)."""
    b, batch = case
    model, w = b.model, _weights(batch)
    model.zero_grad()
    target = batch["labels"][:, 1:]
    ref_ce = F.cross_entropy(_hf_full_logits(model, batch)[:, :-1].flatten(0, 1), target.flatten(),
                             ignore_index=IGNORE, reduction="none").view_as(target)
    ref = (ref_ce * w).sum()
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    step = VLM(model, loss_chunk=5)
    n_sup = int((target != IGNORE).sum())
    widths = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[0]))
    try:
        if path == "fused":
            ours, ce = step(batch, weights=w)
        else:
            ce, _ = step(batch, nll=True)
            ours = (ce * w).sum()
        ours.backward()
    finally:
        hook.remove()
    if path == "recomputed":  # lm_head saw only supervised positions, a chunk at a time (forward and recompute)
        assert max(widths) == 5 and sum(widths) == 2 * n_sup
    else:  # the fused path multiplies by the weight itself, never through the module
        assert widths == []
    assert torch.allclose(ce.detach(), ref_ce, rtol=1e-5, atol=1e-6)
    assert abs(float(ours) - float(ref)) <= 1e-6 * abs(float(ref))
    _close(_grads(model), ref_grads)


def test_the_fused_loss_with_a_frozen_lm_head_still_trains_what_lies_below(case):
    """s0_merger freezes the llm: lm_head gets no gradient, the merger below it gets the full-logits one."""
    b, batch = case
    model, w = b.model, _weights(batch)
    model.lm_head.weight.requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        target = batch["labels"][:, 1:]
        ref = (F.cross_entropy(_hf_full_logits(model, batch)[:, :-1].flatten(0, 1), target.flatten(),
                               ignore_index=IGNORE, reduction="none").view_as(target) * w).sum()
        ref.backward()
        ref_grads = _grads(model)
        model.zero_grad(set_to_none=True)
        loss, _ = VLM(model, loss_chunk=5)(batch, weights=w)
        (loss * 3.0).backward()  # an upstream scale reaches the stored gradients
        assert model.lm_head.weight.grad is None
        _close({n: g / 3.0 for n, g in _grads(model).items()}, ref_grads)
    finally:
        model.lm_head.weight.requires_grad_(True)


def test_log_probs_and_entropy_equal_the_full_softmax(case):
    """The preference/RL path: log p of the targets and the entropy per supervised position."""
    b, batch = case
    with torch.no_grad():
        logits = _hf_full_logits(b.model, batch)[:, :-1]
        logps, ent = VLM(b.model, loss_chunk=7)(batch, entropy=True)
    target = batch["labels"][:, 1:]
    sup = target != IGNORE
    lsm = torch.log_softmax(logits, -1)
    ref = torch.where(sup, lsm.gather(-1, target.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    ref_ent = torch.where(sup, -(lsm.exp() * lsm).sum(-1), torch.zeros(()))
    assert torch.allclose(logps, ref, rtol=1e-5, atol=1e-5) and torch.allclose(ent, ref_ent, rtol=1e-4, atol=1e-5)
    assert (logps[~sup] == 0).all() and (ent[~sup] == 0).all()


def test_a_micro_batch_without_supervised_tokens_keeps_every_module_in_the_backward(case):
    """Zero supervised tokens: still one (empty) lm_head chunk, so every
    parameter gets a (zero) gradient, as ranks of one step must reduce the same gradients."""
    b, batch = case
    quiet = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    model = b.model
    model.zero_grad(set_to_none=True)
    ce, _ = VLM(model)(quiet, nll=True)
    (ce * _weights(quiet)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None][:5]
    assert all(float(g.abs().sum()) == 0 for g in grads.values())


def test_text_only_micro_batch_runs_the_vit_on_a_dummy_with_no_effect(case):
    """No media: the ViT still runs (one 2x2-patch image) and adds exactly 0, so its parameters have zero
    gradients rather than none, and the loss equals the HF model's text-only forward."""
    b, _ = case
    samples = [text_sample(b, i) for i in range(3)]
    cfg = PackConfig(seq_len=max(len(s["input_ids"]) for s in samples) * 2, buffer_size=4,
                     pad_id=b.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    batch = collate([r for s in samples for r in packer.add(s)] + packer.flush(), cfg)
    model = b.model
    model.zero_grad(set_to_none=True)
    ce, _ = VLM(model)(batch, nll=True)
    ce.sum().backward()
    vit = [p.grad for n, p in model.named_parameters() if n.startswith("model.visual.")]
    assert vit and all(g is not None and float(g.abs().sum()) == 0 for g in vit)
    with torch.no_grad():
        target = batch["labels"][:, 1:]
        ref = F.cross_entropy(_hf_full_logits(model, batch)[:, :-1].flatten(0, 1), target.flatten(),
                              ignore_index=IGNORE, reduction="none").view_as(target)
    assert torch.allclose(ce.detach(), ref, rtol=1e-5, atol=1e-6)


def test_the_step_module_shares_the_hf_parameters_under_their_names(case):
    b, _ = case
    step = VLM(b.model)
    assert dict(step.named_parameters()).keys() == dict(b.model.named_parameters()).keys()
    assert all(p is q for p, q in zip(step.parameters(), b.model.parameters()))
    assert step.loss_chunk == 2**28 // (4 * b.model.config.get_text_config().vocab_size)
