"""SAPO/GRPO/GSPO: the loss equals trl's GRPOTrainer._compute_loss on the same inputs (value and gradient);
group-relative advantages and group dropping follow the definitions; the objective rolls out, scores and
trains on a tiny real model."""
from __future__ import annotations

import collections
import types

import pytest
import torch

from data.errors import BadSample
from reward_audit import crafted, evil_module, watching
from stages.sapo import Config, RLObjective, group_advantages, policy_loss

USER_REWARDS = {"odd_length": "reward_helpers:odd_length", "one": "reward_helpers:always_one",
                "short": "reward_helpers:short_enough"}  # stage.objective.rewards as a user writes it


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


# -- the objective on a tiny real model ------------------------------------------------------------------------
def _prompts(bundle, reward="odd_length"):
    from test_dpo import chat_sample

    return [chat_sample(bundle, "How many shapes are there?", None, True, kind="prompt", group=0, key="q0",
                        answer="3", reward=reward, source="rl_count"),
            chat_sample(bundle, "Name a colour.", None, False, kind="prompt", group=1, key="q1", answer="red",
                        reward=reward, source="rl_colour")]


def _objective(bundle, **kw):
    obj = RLObjective(Config(num_generations=4, max_new_tokens=6, mini_batches=2, rewards=dict(USER_REWARDS), **kw))
    obj.tokenizer = bundle.tokenizer  # what setup(run) takes from run.bundle
    return obj


def test_rollout_on_policy_loss_then_off_policy_gate_and_prompt_stash():
    from test_dpo import pack, tiny

    torch.manual_seed(0)
    b = tiny("qwen2_5_vl")
    pad = b.tokenizer.pad_token_id
    prompts = _prompts(b)
    micro = [pack(b.model, [[p] for p in prompts], pad)]
    obj = _objective(b, drop_equal_groups=False)
    step = obj.prepare(b.model, micro)
    assert len(step) == 1 and len(obj._queue) == 1  # one micro-batch per step, one mini-batch left
    mb = step[0]
    assert mb["input_ids"].shape[0] == 4  # 2 prompts x 4 rollouts over 2 mini-batches
    for i, m in enumerate(mb["meta"]):  # each row starts with its own prompt; labels only after it
        p = prompts[int(m["key"][1])]["input_ids"]
        assert torch.equal(mb["input_ids"][i, :len(p)], p)
        assert (mb["labels"][i, :len(p)] == -100).all() and (mb["labels"][i, len(p):] != -100).any()
    n_img = sum(m["key"] == "q0" for m in mb["meta"])
    assert n_img == 2  # q0's image is stored once for its rows (the ViT runs once, features tiled per row)
    assert mb["image_grid_thw"].shape[0] == 1 and mb["pixel_values"].shape[0] == 16
    assert torch.equal(mb["pixel_values"], prompts[0]["pixel_values"])
    assert mb["visual_owner"].tolist() == [0] * n_img + [1] * (4 - n_img)

    # on-policy (first mini-batch): ratio 1, gate weight 1, loss = sum_i -(2/tau_i) A_i
    w = obj.weights(mb)
    ls, stats = obj.loss_sum(b.model, dict(mb, weights=w))
    adv = mb["advantages"]
    tau = torch.where(adv > 0, 1.0, 1.05)
    assert abs(float(ls) - float((-2 / tau * adv).sum())) < 1e-5
    s = stats["sums"]
    assert abs(s["policy/gate"][0] - s["policy/gate"][1]) < 1e-4 and obj.step_sums()["reward/mean"][1] == 8
    ls.backward()
    opt = torch.optim.SGD([p for p in b.model.parameters() if p.grad is not None], lr=1.0)
    opt.step()
    opt.zero_grad()

    # second mini-batch: the prompts that arrive now are kept for the next rollout; the policy has moved
    step = obj.prepare(b.model, micro)
    assert not obj._queue and len(obj._stash) == 2
    ls, stats = obj.loss_sum(b.model, dict(step[0], weights=obj.weights(step[0])))
    gate, n = stats["sums"]["policy/gate"]
    assert gate / n < 0.999 and torch.isfinite(ls)
    # next rollout: stashed + new prompts, 16 rollouts over 2 mini-batches
    step = obj.prepare(b.model, micro)
    assert step[0]["input_ids"].shape[0] == 8 and len(obj._queue) == 1 and not obj._stash
    assert obj.state_dict()["rollouts"] == 2


def test_all_equal_groups_are_dropped_and_counted_with_zero_weight_stand_ins():
    from test_dpo import pack, tiny

    torch.manual_seed(0)
    b = tiny("qwen2_vl")
    obj = _objective(b)
    micro = [pack(b.model, [[p] for p in _prompts(b, reward="exact_match")], b.tokenizer.pad_token_id)] * 2
    step = obj.prepare(b.model, micro)  # a random model never says "3" or "red": every group all-zero
    assert len(step) == 2  # as many micro-batches as the loop gave (grad accumulation)
    assert all(float(obj.weights(mb).sum()) == 0 for mb in step)
    assert obj.step_sums()["rollout/dropped_groups"] == [4.0, 4.0]
    assert obj.state_dict()["dropped_groups"] == 4
    ls, _ = obj.loss_sum(b.model, dict(step[0], weights=obj.weights(step[0])))
    assert float(ls) == 0.0
    held_out = obj.evaluate(b.model, micro[:1])  # greedy, one completion per prompt, no training
    assert held_out["eval/reward"] == [0.0, 2.0] and held_out["eval/pass_rate"][1] == 2.0


@pytest.mark.parametrize("reward", ["exact", "builtins:eval", {"name": "short", "extra": 1}])
def test_unknown_reward_fails_before_generation(reward, monkeypatch):
    """The rollout-time check behind the loader's check_sample: an unusable reward is a ValueError, no generation."""
    from test_dpo import pack, tiny

    from stages import rollout

    b = tiny("qwen2_vl")
    micro = [pack(b.model, [[p] for p in _prompts(b, reward=reward)], b.tokenizer.pad_token_id)]
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: pytest.fail("generated before checking the reward"))
    with pytest.raises(ValueError, match="RL sample 'q0': reward"):
        _objective(b).prepare(b.model, micro)


def test_rollout_metrics_are_reported_by_step_sums_when_no_group_carries_signal():
    """Every group all-equal: every weight is 0, so the loop runs no micro-batch (loss_sum is never called); the
    rewards must still be logged, through step_sums, once per rollout."""
    from test_dpo import pack, tiny

    torch.manual_seed(0)
    b = tiny("qwen2_vl")
    obj = _objective(b)
    micro = [pack(b.model, [[p] for p in _prompts(b, reward="one")], b.tokenizer.pad_token_id)]
    assert obj.step_sums() == {}
    step = obj.prepare(b.model, micro)
    assert all(float(obj.weights(mb).sum()) == 0 for mb in step)
    sums = obj.step_sums()
    assert sums["reward/mean"] == [8.0, 8.0] and sums["reward/pass_rate"] == [8.0, 8.0]
    assert sums["rollout/dropped_groups"] == [2.0, 2.0] and sums["reward/group_std"] == [0.0, 2.0]
    assert sums["rollout/response_length"][1] == 8.0
    assert obj.step_sums() == {}  # cleared: each rollout is counted once
    obj.prepare(b.model, micro)  # the rollout's second mini-batch: no new rollout, nothing to report
    assert obj.step_sums() == {}
    _, stats = obj.loss_sum(b.model, dict(step[0], weights=obj.weights(step[0])))
    assert not any(k.startswith(("reward/", "rollout/")) for k in stats["sums"])  # not on micro-batch 0 any more


# -- the loader's check: data names registered rewards only --------------------------------------------------
def _sample(reward, kind="prompt"):
    """An encoder output as the loader hands it to check_sample."""
    return {"key": "shard-000000007", "source": "third_party", "kind": kind, "reward": reward, "answer": "3"}


@pytest.mark.parametrize("i", range(6))
def test_check_sample_refuses_crafted_rewards_before_any_import(i, tmp_path, monkeypatch):
    import importlib
    import os
    import sys

    module, marker = evil_module(tmp_path, f"evil_sapo_{i}")
    monkeypatch.syspath_prepend(str(tmp_path))
    obj = RLObjective(Config(rewards=dict(USER_REWARDS)))
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with watching(tmp_path) as events:
        with pytest.raises(BadSample) as e:
            obj.check_sample(_sample(crafted(module)[i]))
    assert events == [] and imported == [], (events, imported)
    assert not os.path.exists(marker) and module not in sys.modules
    assert e.value.key == "shard-000000007"
    if e.value.reason == "unknown_reward":
        for name in ("exact_match", "numeric", "odd_length", "one", "short", "stage.objective.rewards"):
            assert name in e.value.detail, e.value.detail
    else:
        assert e.value.reason == "bad_reward_options" and "'x'" in e.value.detail


def test_check_sample_passes_registered_rewards_with_declared_options_only():
    obj = RLObjective(Config(rewards=dict(USER_REWARDS)))
    for ok in ("numeric", {"name": "box_iou", "threshold": 0.7}, "one", {"name": "short", "limit": 4, "bonus": 1}):
        obj.check_sample(_sample(ok))
    with pytest.raises(BadSample) as e:
        obj.check_sample(_sample({"name": "short", "extra": True}))  # short_enough takes **extra: still refused
    assert e.value.reason == "bad_reward_options" and "['bonus', 'limit']" in e.value.detail
    with pytest.raises(BadSample) as e:
        obj.check_sample(_sample({"name": "numeric", "abs_tol": {"$eval": "x"}}))
    assert e.value.reason == "bad_reward_options"
    with pytest.raises(BadSample, match="names no reward"):
        obj.check_sample(_sample(None))
    RLObjective(Config(default_reward="one", rewards=dict(USER_REWARDS))).check_sample(_sample(None))
    obj.check_sample(_sample("subprocess:run", kind="chosen"))  # not an RL prompt: another stage's check
    obj.check_sample(_sample(None, kind=None))


def test_config_registered_reward_scores_rollouts_through_the_stage_config():
    """stage.objective.rewards from the stage yaml (empty by default) plus a user entry, resolved at build time."""
    from omegaconf import OmegaConf

    from conftest import REPO
    from stages import build_objective

    objective = OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/sapo.yaml").objective)
    assert objective["rewards"] == {} and build_objective(objective).rewards.fns.keys() == {
        "exact_match", "numeric", "choice", "box_iou", "format"}
    obj = build_objective({**objective, "rewards": {"short": "reward_helpers:short_enough"}})
    meta = {"key": "k", "answer": None, "reward": {"name": "short", "limit": 2, "bonus": 0.25}}
    assert obj.rewards("ab", meta) == 1.25 and obj.rewards("abc", meta) == 0.25
    with pytest.raises(ValueError, match="stage.objective.rewards.numeric"):
        build_objective({**objective, "rewards": {"numeric": "reward_helpers:always_one"}})
    with pytest.raises(ValueError, match="stage.objective.default_reward='nope'"):
        build_objective({**objective, "default_reward": "nope"})


TWO_RANKS = r'''
import json, os, sys, types
sys.path[:0] = [REPO, REPO + "/tests"]
import torch
from training.train import init_distributed
from training import models
from training.loop import JobConfig
from training.engine import EngineConfig, build as build_engine
from training.vlm import VLM
from stages.objective import Context
from stages import StageConfig
from stages.dpo import DPOObjective, Config as DC
from stages.sapo import RLObjective, Config as SC
from test_dpo import dpo_pairs, pack
from test_sapo import _prompts
rank, world = init_distributed()
zs = int(sys.argv[1])
job = JobConfig()
job.model = models.ModelConfig(name="tiny_qwen2_5_vl", family="qwen2_5_vl")
job.engine = EngineConfig(name=f"zero{zs}", zero_stage=zs)
job.stage = StageConfig(name="rl", trainable=["merger", "llm"])
job.trainer.micro_batch_size, job.trainer.grad_accum = 1, 1
b = models.build(job.model)
groups = models.param_groups(b.model, b.family)
models.apply_trainable(b.model, groups, job.stage.trainable)
helper = models.build(job.model)  # batches need get_rope_index, not the (partitioned) weights
dmb = pack(helper.model, dpo_pairs(helper), helper.tokenizer.pad_token_id)
rmb = pack(helper.model, [[p] for p in _prompts(helper)], helper.tokenizer.pad_token_id)
engine = build_engine(VLM(b.model), groups, job.stage, job.engine, 1, 1, world, 10)
run = Context(engine, b, lambda: engine.build_frozen(VLM(models.build(job.model).model)))
out = {}
dpo = DPOObjective(DC()); dpo.setup(run)
out["ref_partitioned"] = sum(hasattr(p, "ds_id") for p in dpo.ref.parameters())
dmb["weights"] = dpo.weights(dmb)
ls, _ = dpo.loss_sum(engine, dmb)
out["dpo"] = float(ls)
engine.backward(ls); engine.step()
torch.manual_seed(rank)
# ranks decode different numbers of steps (as completions of different lengths do): under ZeRO-3 every decode
# step all-gathers weights, so generation must keep the finished rank stepping (synced_gpus) or it hangs
rl = RLObjective(SC(num_generations=4, max_new_tokens=4 + 3 * rank, kl_beta=0.04, drop_equal_groups=False,
                    rewards={"odd_length": "reward_helpers:odd_length"}))
rl.setup(run)
mb = rl.prepare(engine, [rmb])[0]
mb["weights"] = rl.weights(mb)
ls, st = rl.loss_sum(engine, mb)
engine.backward(ls); engine.step()
out["rl"], out["kl"] = float(ls), st["sums"]["policy/kl"]
out["lengths"] = mb["attention_mask"].sum(-1).tolist()
open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w").write(json.dumps(out))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process
'''


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_reference_and_rollouts_under_zero(zero, tmp_path):
    """2 gloo ranks: the reference is sharded like the policy under ZeRO-3, DPO starts at 2 log 2 per 2 pairs,
    ranks sampling different completions still generate in step (synced_gpus) and train."""
    import json
    import math
    import subprocess

    from conftest import REPO, clean_env

    script = tmp_path / "two_ranks.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + TWO_RANKS)
    p = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", str(script), str(zero), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in rows:
        assert abs(r["dpo"] - 2 * math.log(2)) < 1e-5
        assert (r["ref_partitioned"] > 0) == (zero == 3)
        assert math.isfinite(r["rl"]) and r["kl"][0] > 0
    assert rows[0]["lengths"] != rows[1]["lengths"]


@pytest.mark.slow
def test_rewards_are_logged_on_steps_that_train_on_nothing(tmp_path):
    """End to end through the loop (training/loop.py adds step_sums every step): a random tiny model never says a
    shapes answer exactly, so every group is all-zero and dropped and no step trains, yet every rollout step logs
    its reward and dropped-group share."""
    from conftest import metrics_rows, run_stage

    run_stage(tmp_path, ["stage=sapo", "stage.mixture={rl: 1}", "model=tiny_qwen2_vl", "trainer.micro_batch_size=1",
                         "trainer.max_steps=2", "stage.objective.num_generations=2",
                         "stage.objective.max_new_tokens=4", "stage.objective.mini_batches=1"])
    rows = [r for r in metrics_rows(tmp_path) if "step" in r and "loss" in r]
    assert len(rows) == 2 and all(r["skipped"] for r in rows), rows
    assert all(r.get("reward/mean") == 0.0 and r.get("rollout/dropped_groups") == 1.0 for r in rows), rows
