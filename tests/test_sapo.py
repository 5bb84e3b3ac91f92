"""SAPO/GRPO/GSPO: the loss equals trl's GRPOTrainer._compute_loss on the same inputs (value and gradient);
group-relative advantages and group dropping follow the definitions; the objective rolls out, scores and
trains on a tiny real model."""
from __future__ import annotations

import collections
import types

import pytest
import torch

from stages.sapo import Config, RLObjective, group_advantages, policy_loss


# -- trl reference ---------------------------------------------------------------------------------------------
def _trl_loss(loss, cfg: Config, logps, old, adv, mask, ref=None):
    """trl 1.16's GRPOTrainer._compute_loss (unbound) with a minimal `self` read from a real GRPOConfig the way
    GRPOTrainer.__init__ reads it; the per-token log-probs of the policy are the given tensor."""
    from accelerate import Accelerator
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir="/tmp/trl_grpo_parity", loss_type="grpo" if loss == "gspo" else loss,
                      importance_sampling_level="sequence" if loss == "gspo" else "token",
                      epsilon=cfg.eps_low, epsilon_high=cfg.eps_high, beta=cfg.kl_beta,
                      sapo_temperature_pos=cfg.tau_pos, sapo_temperature_neg=cfg.tau_neg,
                      use_bias_correction_kl=cfg.kl_ratio_correction, use_cpu=True,
                      bf16=False, report_to=[])
    B, T = logps.shape
    model = types.SimpleNamespace(training=True)
    me = types.SimpleNamespace(
        args=args, model=model, accelerator=Accelerator(cpu=True), loss_type=args.loss_type, beta=args.beta,
        importance_sampling_level=args.importance_sampling_level, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=args.max_completion_length, _metrics={"train": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None))
    inputs = {"prompt_ids": torch.zeros(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(me, model, inputs), me._metrics["train"]


def _batch(B=6, T=7, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    old = -torch.rand(B, T, generator=g) * 2
    logps = (old + torch.randn(B, T, generator=g) * spread).requires_grad_(True)  # off-policy: ratios != 1
    adv = torch.randn(B, generator=g)
    ref = old + torch.randn(B, T, generator=g) * 0.2
    return logps, old, adv, mask, ref


@pytest.mark.parametrize("loss", ["sapo", "grpo", "gspo"])
@pytest.mark.parametrize("kl_beta,correction", [(0.0, False), (0.04, False), (0.04, True)])
def test_loss_equals_trl_value_and_gradient(loss, kl_beta, correction):
    cfg = Config(loss=loss, kl_beta=kl_beta, eps_low=0.2, eps_high=0.28, tau_pos=1.0, tau_neg=1.05,
                 kl_ratio_correction=correction)
    if loss == "gspo":
        cfg.eps_low, cfg.eps_high = 3e-2, 4e-2  # small enough that some sequence ratios are clipped
    logps, old, adv, mask, ref = _batch()
    want, metrics = _trl_loss(loss, cfg, logps, old, adv, mask, ref if kl_beta else None)
    (g_want,) = torch.autograd.grad(want, logps)
    per_seq, st = policy_loss(cfg, logps, old, adv, mask, ref if kl_beta else None)
    got = per_seq.mean()
    (g_got,) = torch.autograd.grad(got, logps)
    assert abs(float(got) - float(want)) < 1e-6, (float(got), float(want))
    assert torch.allclose(g_got, g_want, atol=1e-7)
    assert g_got.abs().sum() > 0
    if loss != "sapo":  # token-level clip fraction as trl logs it (its masked mean over completion tokens)
        frac = float(st["clip_frac"].sum() / mask.sum())
        if loss == "grpo":
            assert abs(frac - metrics["clip_ratio/region_mean"][0]) < 1e-6
        assert frac > 0  # the test batch does exercise the clip
    if kl_beta:
        assert abs(float(st["kl"].sum() / mask.sum()) - metrics["kl"][0]) < 1e-6


def test_sapo_gate_is_one_on_policy_and_gradient_is_plain_policy_gradient():
    logps, old, adv, mask, _ = _batch(seed=3)
    on = old.clone().requires_grad_(True)
    per_seq, st = policy_loss(Config(loss="sapo"), on, old, adv, mask)
    assert torch.allclose(st["gate"][mask], torch.ones(int(mask.sum())))
    (g,) = torch.autograd.grad(per_seq.sum(), on)
    want = -(adv[:, None] * mask) / mask.sum(-1, keepdim=True)  # d/dlogp of -A r at r = 1
    assert torch.allclose(g, want, atol=1e-6)
    # off policy the gate damps: a ratio far from 1 gets a small weight, and negative advantages more so
    _, st = policy_loss(Config(loss="sapo"), old + 2.0, old, adv, mask)
    assert float(st["gate"][mask].max()) < 0.5


def test_group_advantages_and_all_equal_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, std, equal = group_advantages(r, g, scale=True, eps=1e-6)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64).std()  # unbiased
    assert torch.allclose(adv[:4], (r[:4] - 0.5) / (s + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))
    assert equal.tolist() == [False] * 4 + [True] * 4
    assert torch.allclose(std[:4], s.expand(4))
    adv, _, _ = group_advantages(r, g, scale=False)
    assert torch.allclose(adv[:4], r[:4] - 0.5)


def test_config_errors_name_the_key():
    for bad, key in (({"loss": "ppo"}, "loss"), ({"num_generations": 1}, "num_generations"),
                     ({"mini_batches": 0}, "mini_batches"), ({"top_p": 1.5}, "top_p"),
                     ({"kl_beta": -1.0}, "kl_beta")):
        with pytest.raises(ValueError, match=f"stage.objective.{key}"):
            RLObjective(Config(**bad))
