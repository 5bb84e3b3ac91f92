"""Held-out evaluation (training/evaluate.py): preference pairs are scored exactly as DPO training scores them,
DPO's held-out preference accuracy takes the step's start model as its reference, and the RL reward is each
record's own reward function applied to the model's greedy answer."""
from __future__ import annotations

import torch

from stages.dpo import pairs
from stages.rewards import Rewards
from stages.rollout import per_sample, token_logps
from test_dpo import pack, tiny
from training import evaluate as ev


def test_held_out_margins_are_the_dpo_objectives_log_probs_of_the_packed_pairs():
    bundle = tiny("qwen3_vl")
    bundle.model.eval()
    cfg = ev.EvalConfig(samples=3)
    got = ev.preference(bundle, cfg)
    # the training path: the same held-out records encoded, packed into one row, scored by the objective's code
    samples = [s for i in range(cfg.samples)
               for s in ev.encode(bundle, *ev._generated(cfg, "preference", i), key=f"p{i}")]
    for s in samples:
        s["meta"] = {"kind": s["kind"], "group": s["group"], "source": s["source"], "key": s["key"]}
    batch = pack(bundle.model, [samples], bundle.tokenizer.pad_token_id)
    c, r = pairs(batch)
    with torch.no_grad():
        sums, _ = per_sample(token_logps(bundle.model, batch)[0], batch)
    want = (sums[c] - sums[r]).tolist()
    assert max(abs(a - b) for a, b in zip(got["pref_margins"], want)) < 1e-3, (got["pref_margins"], want)
    assert got["pref_accuracy"] == sum(m > 0 for m in want) / len(want)


def test_dpo_accuracy_is_the_share_of_pairs_whose_margin_grew_over_the_reference():
    start = {"pref_margins": [0.5, -1.0, 2.0, 0.0]}
    end = {"pref_margins": [0.7, -1.5, 2.0, 3.0]}  # grew, shrank, tied (not counted, as trl's chosen > rejected)
    assert ev.dpo_accuracy(start, end) == 0.5
    assert ev.dpo_accuracy(start, start) == 0.0
    assert ev.dpo_accuracy({}, end) is None and ev.dpo_accuracy(start, {"pref_margins": [1.0]}) is None


def test_rl_reward_scores_the_greedy_answer_with_the_records_reward():
    bundle = tiny("qwen2_5_vl")
    bundle.model.eval()
    cfg = ev.EvalConfig(samples=4)
    rewards, want = Rewards(), []
    with torch.no_grad():
        for i in range(cfg.samples):
            record, media = ev._generated(cfg, "rl", i)
            assert record["reward"] in ("numeric", "exact_match") and record["answer"]
            s = ev.encode(bundle, record, media)[0]
            assert (s["labels"] == -100).all()  # an RL prompt: nothing supervised, ends in the assistant header
            said = ev._greedy(bundle, s, s["input_ids"], s["mm_token_type_ids"], cfg)
            want.append(rewards(said, record))
            want.append(rewards(record["answer"], record))  # the right answer earns the full reward
    got = ev.rl_reward(bundle, cfg)
    assert got["rl_reward"] == sum(want[0::2]) / cfg.samples and all(x == 1.0 for x in want[1::2])
    assert 0.0 <= got["rl_reward_sampled"] <= 1.0 and ev.rl_reward(bundle, cfg) == got  # seeded sampling
    assert "rl_reward_sampled" not in ev.rl_reward(bundle, ev.EvalConfig(samples=1, rl_samples=0))


def test_generation_never_emits_vision_placeholders():
    """A random model samples <|image_pad|> now and then; with no image features behind it the forward would
    fail (tokens/features mismatch), so evaluation masks the placeholders as the RL rollouts do."""
    bundle = tiny("qwen3_vl")
    pad = bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    logits = torch.zeros(2, 3, len(bundle.tokenizer))
    logits[:, -1, pad] = 100.0
    nxt = ev._next_logits(bundle, logits)
    assert nxt.shape == (2, len(bundle.tokenizer)) and int(nxt[0].argmax()) != pad and nxt[0, pad] == float("-inf")
    cfg = ev.EvalConfig(samples=96)
    assert 0.0 <= ev.rl_reward(bundle, cfg)["rl_reward_sampled"] <= 1.0  # the held-out set that hit one before
