"""The MoE router losses and expert-load metrics (training/moe.py) against the Switch / Qwen formula computed here
from the routers' own logits, and against transformers' `load_balancing_loss_func` layer by layer. Split
independence over ranks and accumulation micro-batches is tests/test_mixed_batches.py's `moe` case."""
import math

import pytest
import torch
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf_moe

from data.encode import IGNORE
from data.pack import PackConfig, collate
from test_packing import image_sample, text_sample
from training import moe
from training.models import ModelConfig, build
from training.vlm import VLM


@pytest.fixture(scope="module")
def bundle():
    return build(ModelConfig(name="tiny_qwen3_vl_moe", family="qwen3_vl_moe"))


@pytest.fixture(scope="module")
def batch(bundle):
    """Two packed rows with padding at their ends (sample_ids -1), an image among the samples."""
    samples = [image_sample(bundle, 0), text_sample(bundle, 1), text_sample(bundle, 2), image_sample(bundle, 3)]
    cfg = PackConfig(seq_len=max(len(s["input_ids"]) for s in samples) + 24, buffer_size=4,
                     pad_id=bundle.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    b = collate(rows, cfg)
    assert (b["sample_ids"] < 0).any() and len(rows) >= 2
    return b


def _logits(model):
    """The routers' raw logits of the next forward, in layer order (the test's own hooks)."""
    out = []
    hooks = [m.register_forward_hook(lambda mod, args, o: out.append(o[0]))
             for m in model.modules() if isinstance(m, hf_moe.Qwen3VLMoeTextTopKRouter)]
    return out, hooks


def _switch(logits: list, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, list]:
    """Mean over layers of E · Σ_e f_e · P_e with f_e = (tokens whose top-k holds e) / T and P_e = the mean router
    probability of e, over the tokens in `mask` (f has no gradient); and each layer's counts."""
    losses, counts = [], []
    for lg in logits:
        lg = lg[mask].float()
        E, T = lg.shape[1], lg.shape[0]
        probs = torch.softmax(lg, -1)
        top = probs.topk(k, -1).indices
        c = torch.zeros(E).index_add_(0, top.flatten(), torch.ones(top.numel()))
        losses.append(E * (c / T * probs.mean(0)).sum())
        counts.append(c)
    return torch.stack(losses).mean(), counts


def _run(vlm, batch, cfg):
    """One micro-batch, one rank: (its aux share, the RouterStats). Its `step_sums()` ends the step (and disarms the
    hooks, so it comes after any backward)."""
    stats = moe.RouterStats(vlm, cfg, vlm.config.get_text_config())
    stats.begin(None, [batch])
    with stats.watch(batch):
        vlm(batch, nll=True)
    return stats.loss(), stats


def test_aux_loss_is_the_switch_formula_per_layer_over_real_tokens_and_equals_hf_layer_by_layer(bundle, batch):
    vlm = VLM(bundle.model)
    text = bundle.model.config.text_config
    E, k = text.num_experts, text.num_experts_per_tok
    captured, hooks = _logits(bundle.model)
    try:
        loss, stats = _run(vlm, batch, moe.MoeSettings(aux_loss_coef=1.0))
        sums = stats.step_sums()
    finally:
        for h in hooks:
            h.remove()
    real = (batch["sample_ids"] >= 0).reshape(-1)
    expected, counts = _switch(captured, real, k)
    assert len(captured) == text.num_hidden_layers == len(stats.layers)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert sums["moe/aux_loss"][0] == pytest.approx(float(expected), rel=1e-6)
    # the padding changes the value: it is left out, not averaged in
    assert float(_switch(captured, torch.ones_like(real), k)[0]) != pytest.approx(float(expected), rel=1e-4)
    # transformers' function on one layer's real tokens (it pools layers, so it is compared layer by layer)
    for lg, c in zip(captured, counts):
        hf = hf_moe.load_balancing_loss_func((lg[real],), E, k)
        mine = E * (c / real.sum() * torch.softmax(lg[real].float(), -1).mean(0)).sum()
        assert float(hf) == pytest.approx(float(mine), rel=1e-6)
    # the load metrics from the same counts
    for j, c in enumerate(counts):
        share = c / c.sum()
        entropy = -(share * share.clamp_min(1e-30).log()).sum() / math.log(E)
        assert sums[f"moe/load_entropy/layer{j}"][0] == pytest.approx(float(entropy), rel=1e-6)
        assert sums[f"moe/load_max/layer{j}"][0] == pytest.approx(float(share.max() * E), rel=1e-6)
    assert 1.0 <= sums["moe/load_max"][0] <= E / k


def test_supervised_tokens_and_z_loss(bundle, batch):
    vlm = VLM(bundle.model)
    k = bundle.model.config.text_config.num_experts_per_tok
    captured, hooks = _logits(bundle.model)
    try:
        loss, stats = _run(vlm, batch, moe.MoeSettings(aux_loss_coef=0.5, z_loss_coef=0.25, aux_tokens="supervised"))
        sums = stats.step_sums()
    finally:
        for h in hooks:
            h.remove()
    sup = (batch["labels"] != IGNORE).reshape(-1)
    assert 0 < int(sup.sum()) < int((batch["sample_ids"] >= 0).sum())
    aux, _ = _switch(captured, sup, k)
    z = torch.stack([torch.logsumexp(lg[sup].float(), -1).square().mean() for lg in captured]).mean()
    assert float(loss) == pytest.approx(float(0.5 * aux + 0.25 * z), rel=1e-6)
    assert sums["moe/z_loss"][0] == pytest.approx(float(z), rel=1e-6)


def test_gradient_is_the_formulas_through_routers_and_hidden_states_also_with_checkpointing(batch):
    """The aux share's gradient equals autograd of the formula on the routers' logits (counts constant): into the
    routers and, through the hidden states, into earlier layers. With activation checkpointing the routers run
    again in backward; the gradients are the same."""
    grads = {}
    for ckpt in (False, True):
        b = build(ModelConfig(name="tiny_qwen3_vl_moe", family="qwen3_vl_moe", gradient_checkpointing=ckpt))
        b.model.train()
        vlm = VLM(b.model)
        names = ["model.language_model.layers.3.mlp.gate.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
                 "model.language_model.layers.1.mlp.experts.gate_up_proj"]
        params = [dict(vlm.named_parameters())[n] for n in names]
        captured, hooks = _logits(b.model)
        try:
            loss, _ = _run(vlm, batch, moe.MoeSettings(aux_loss_coef=1.0))
            text = b.model.config.text_config
            expected, _ = _switch(captured[:text.num_hidden_layers], (batch["sample_ids"] >= 0).reshape(-1),
                                  text.num_experts_per_tok)
            g = torch.autograd.grad(loss, params, retain_graph=True)
            ref = torch.autograd.grad(expected, params)
        finally:
            for h in hooks:
                h.remove()
        for n, a, r in zip(names, g, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7, msg=n)
        assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0  # flows through earlier layers' hidden states
        grads[ckpt] = g
    for a, r in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_a_forward_without_grad_inside_the_step_is_not_recorded(bundle, batch):
    """A LoRA policy's frozen reference runs the same routers under no_grad inside the objective: the training
    forward's statistics stay."""
    vlm = VLM(bundle.model)
    stats = moe.RouterStats(vlm, moe.MoeSettings(aux_loss_coef=1.0), bundle.model.config.text_config)
    stats.begin(None, [batch])
    with stats.watch(batch):
        vlm(batch, nll=True)
        with torch.no_grad():
            vlm(batch, nll=True)
    assert stats.loss().requires_grad


def test_dense_models_have_no_router_and_the_settings_are_checked():
    dense = build(ModelConfig(name="tiny_qwen3_vl", family="qwen3_vl"))
    assert isinstance(moe.build(VLM(dense.model), dense.family, moe.MoeSettings(), dense.model.config.text_config),
                      moe.NoRouter)
    assert moe.sparse_blocks(dense.model) == set()
    for bad, match in ((dict(aux_tokens="all"), "aux_tokens"), (dict(aux_scope="step"), "aux_scope"),
                       (dict(aux_loss_coef=-1.0), "aux_loss_coef"), (dict(z_loss_coef=float("nan")), "z_loss_coef")):
        with pytest.raises(ValueError, match=match):
            moe.MoeSettings(**bad).check()


def test_the_default_coefficient_is_the_checkpoints_and_rl_trains_without(bundle):
    from conftest import compose
    from training.train import to_job

    text = bundle.model.config.text_config
    vlm = VLM(bundle.model)
    for stage, coef in (("s1_multimodal", text.router_aux_loss_coef), ("sft", text.router_aux_loss_coef),
                        ("sapo", 0.0)):
        job = to_job(compose([f"stage={stage}", "model=tiny_qwen3_vl_moe"]))
        assert moe.RouterStats(vlm, job.stage.moe, text).coef == coef
    assert text.router_aux_loss_coef > 0
    assert moe.sparse_blocks(bundle.model) == {hf_moe.Qwen3VLMoeTextSparseMoeBlock}
