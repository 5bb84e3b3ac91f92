"""DPO: each loss equals trl's DPOTrainer on the same log-probs (value and gradient), and the objective on a tiny
real model computes the reply log-probs of packed pairs exactly as running each reply alone."""
from __future__ import annotations

import types

import pytest
import torch

from stages.dpo import Config, DPOObjective, pair_losses


# -- trl reference ---------------------------------------------------------------------------------------------
def _trl_loss(loss_types, loss_weights, beta, label_smoothing, per_token, mask, ref_c, ref_r):
    """trl 1.16's DPOTrainer._compute_loss (the unbound method) on given per-token log-probs.

    The minimal `self` is built from a real DPOConfig the way DPOTrainer.__init__ reads it; the "model" returns
    the per-token log-probs (zero outside the completion, as trl's fused head does) for rows [chosen; rejected]."""
    from accelerate import Accelerator
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="/tmp/trl_dpo_parity", loss_type=loss_types, loss_weights=loss_weights, beta=beta,
                     label_smoothing=label_smoothing, precompute_ref_log_probs=True, use_cpu=True, bf16=False,
                     report_to=[])
    B2, T = per_token.shape

    class Model:
        training = True

        def __call__(self, **kw):
            z = torch.zeros(B2, T)
            return types.SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z,
                                         is_top1=torch.zeros(B2, T, dtype=torch.bool))

    model = Model()
    me = types.SimpleNamespace(
        model=model, accelerator=Accelerator(cpu=True), aux_loss_enabled=False, beta=args.beta,
        precompute_ref_logps=args.precompute_ref_log_probs, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting, args=args,
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    completion_mask = torch.cat([torch.zeros(B2, 1, dtype=torch.long), mask.long()], 1)
    inputs = {"input_ids": torch.zeros(B2, T + 1, dtype=torch.long), "attention_mask": torch.ones(B2, T + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(me, model, inputs, return_outputs=False), me._metrics["train"]


def _pairs(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, T + 1, (2 * B,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    per_token = (-torch.rand(2 * B, T, generator=g) * 3 * mask).requires_grad_(True)
    ref = per_token.detach().sum(1) + torch.randn(2 * B, generator=g) * 2
    return per_token, mask, ref


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2),
                                            ("sigmoid_norm", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_equals_trl_value_and_gradient(loss, smoothing, beta):
    per_token, mask, ref = _pairs()
    B = per_token.shape[0] // 2
    want, metrics = _trl_loss([loss], None, beta, smoothing, per_token, mask, ref[:B], ref[B:])
    (g_want,) = torch.autograd.grad(want, per_token)
    sums, lens = per_token.sum(1), mask.sum(1).float()
    got = pair_losses(Config(beta=beta, loss=loss, label_smoothing=smoothing),
                      sums[:B], sums[B:], ref[:B], ref[B:], lens[:B], lens[B:]).mean()
    (g_got,) = torch.autograd.grad(got, per_token)
    assert abs(float(got) - float(want)) < 1e-6 * max(1.0, abs(float(want))), (loss, float(got), float(want))
    assert torch.allclose(g_got, g_want, atol=1e-7)
    # reward metrics as trl logs them
    rc, rr = beta * (sums[:B] - ref[:B]).detach(), beta * (sums[B:] - ref[B:]).detach()
    assert abs(float((rc - rr).mean()) - metrics["rewards/margins"][0]) < 1e-6
    assert abs(float((rc > rr).float().mean()) - metrics["rewards/accuracies"][0]) < 1e-6


def test_cdpo_is_trl_sigmoid_mixed_with_the_swapped_pair():
    """cDPO (sigmoid with label smoothing eps) = (1-eps)*DPO(y_w, y_l) + eps*DPO(y_l, y_w), both from trl."""
    per_token, mask, ref = _pairs(seed=1)
    B, eps = per_token.shape[0] // 2, 0.15
    fwd, _ = _trl_loss(["sigmoid"], None, 0.1, 0.0, per_token, mask, ref[:B], ref[B:])
    swapped = torch.cat([per_token[B:], per_token[:B]])
    bwd, _ = _trl_loss(["sigmoid"], None, 0.1, 0.0, swapped, torch.cat([mask[B:], mask[:B]]), ref[B:], ref[:B])
    sums, lens = per_token.sum(1), mask.sum(1).float()
    got = pair_losses(Config(loss="sigmoid", label_smoothing=eps), sums[:B], sums[B:], ref[:B], ref[B:],
                      lens[:B], lens[B:]).mean()
    assert abs(float(got) - float((1 - eps) * fwd + eps * bwd)) < 1e-6


def test_rpo_term_equals_trl_sft_loss_when_chosen_lengths_match():
    """RPO adds alpha * NLL(chosen)/|y_w| per pair (the RPO paper); trl's 'sft' term is the batch token mean,
    the same number when all chosen replies have one length."""
    per_token, mask, ref = _pairs(seed=2)
    B, alpha = per_token.shape[0] // 2, 0.7
    mask[:B] = torch.arange(mask.shape[1])[None] < 5
    per_token = (per_token.detach() * mask).requires_grad_(True)
    want, _ = _trl_loss(["sigmoid", "sft"], [1.0, alpha], 0.1, 0.0, per_token, mask, ref[:B], ref[B:])
    sums, lens = per_token.sum(1), mask.sum(1).float()
    pref = pair_losses(Config(), sums[:B], sums[B:], ref[:B], ref[B:], lens[:B], lens[B:])
    got = (pref + alpha * (-sums[:B] / lens[:B])).mean()
    assert abs(float(got) - float(want)) < 1e-6


def test_config_errors_name_the_key():
    for bad, key in (({"loss": "kto"}, "loss"), ({"reference": "none"}, "reference"), ({"beta": 0.0}, "beta"),
                     ({"label_smoothing": 0.5, "loss": "robust"}, "label_smoothing"),
                     ({"label_smoothing": 0.1, "loss": "ipo"}, "label_smoothing")):
        with pytest.raises(ValueError, match=f"stage.objective.{key}"):
            DPOObjective(Config(**bad))
