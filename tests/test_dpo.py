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


# -- the objective on a tiny real model ------------------------------------------------------------------------
def tiny(family: str, seed: int = 0):
    from training import models

    return models.build(models.ModelConfig(name=f"tiny_{family}", family=family, init_seed=seed))


def chat_sample(bundle, question: str, reply: str | None, image: bool, **meta) -> dict:
    """One sample as the encoder makes it: chat tokens, labels on the reply (+ <|im_end|>), an optional image
    of a 1x4x4 patch grid (4 merged tokens) with random pixels."""
    tok = bundle.tokenizer
    vis = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" if image else ""
    prompt = tok.encode(f"<|im_start|>user\n{vis}{question}<|im_end|>\n<|im_start|>assistant\n",
                        add_special_tokens=False)
    answer = tok.encode(f"{reply}<|im_end|>", add_special_tokens=False) if reply is not None else []
    ids = torch.tensor(prompt + answer)
    labels = torch.full_like(ids, -100)
    labels[len(prompt):] = ids[len(prompt):]
    s = {"input_ids": ids, "labels": labels,
         "mm_token_type_ids": (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long(), "meta": meta}
    if image:
        fam = bundle.family
        g = torch.Generator().manual_seed(len(question) + len(reply or ""))
        s["pixel_values"] = torch.randn(16, 3 * 2 * fam.patch_size ** 2, generator=g)
        s["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    return s


def pack(model, rows: list[list[dict]], pad_id: int) -> dict:
    """The data/README.md micro-batch: samples packed in rows, each with its own get_rope_index ids (HF's, run
    on the sample alone), block-diagonal causal mask; padding attends to itself."""
    B = len(rows)
    L = max(sum(len(s["input_ids"]) for s in r) for r in rows) + 2
    batch = {"input_ids": torch.full((B, L), pad_id), "labels": torch.full((B, L), -100),
             "mm_token_type_ids": torch.zeros(B, L, dtype=torch.long), "sample_ids": torch.full((B, L), -1),
             "position_ids": torch.zeros(3, B, L, dtype=torch.long),
             "attention_mask": torch.eye(L, dtype=torch.bool).repeat(B, 1, 1, 1)}
    samples = []
    for b, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            pos, _ = model.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None],
                                                image_grid_thw=s.get("image_grid_thw"))
            sl = slice(at, at + n)
            batch["input_ids"][b, sl], batch["labels"][b, sl] = s["input_ids"], s["labels"]
            batch["mm_token_type_ids"][b, sl], batch["sample_ids"][b, sl] = s["mm_token_type_ids"], len(samples)
            batch["position_ids"][:, b, sl] = pos[:, 0]
            batch["attention_mask"][b, 0, sl, sl] = torch.ones(n, n, dtype=torch.bool).tril()
            samples.append(s)
            at += n
    for key in ("pixel_values", "image_grid_thw"):
        if any(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    batch["sources"] = [s["meta"].get("source", "default") for s in samples]
    batch["meta"] = [dict(s["meta"]) for s in samples]
    return batch


def alone_logp(model, s: dict) -> tuple[torch.Tensor, int]:
    """Summed reply log-prob of one sample run by itself through the HF model (no packing, no mask)."""
    kw = {k: s[k] for k in ("pixel_values", "image_grid_thw") if k in s}
    logits = model(input_ids=s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None], **kw).logits
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    tgt = s["labels"][1:]
    sup = tgt != -100
    return lp[sup].gather(-1, tgt[sup][:, None]).sum(), int(sup.sum())


def dpo_pairs(bundle):
    pairs = [("What colour is the circle?", "red", "a large blue square", True, "shapes"),
             ("How many shapes are there?", "three", "2", False, "text")]
    out = []
    for g, (q, good, bad, image, src) in enumerate(pairs):
        out.append([chat_sample(bundle, q, good, image, kind="chosen", group=g, key=f"p{g}", source=src),
                    chat_sample(bundle, q, bad, image, kind="rejected", group=g, key=f"p{g}", source=src)])
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_pairs_loss_equals_formula_on_replies_run_alone(family):
    policy, ref = tiny(family), tiny(family, seed=1).model
    ref.requires_grad_(False)
    rows = dpo_pairs(policy)
    batch = pack(policy.model, rows, policy.tokenizer.pad_token_id)
    cfg = Config(loss="sigmoid", beta=0.1, rpo_alpha=0.3)
    obj = DPOObjective(cfg)
    obj.ref = ref
    ls, stats = obj.loss_sum(policy.model, dict(batch, weights=obj.weights(batch)))
    want, acc = 0.0, 0.0
    with torch.no_grad():
        for c, r in rows:
            (pc, nc), (pr, nr) = alone_logp(policy.model, c), alone_logp(policy.model, r)
            (rc, _), (rr, _) = alone_logp(ref, c), alone_logp(ref, r)
            pl = pair_losses(cfg, pc, pr, rc, rr, torch.tensor(nc), torch.tensor(nr))
            want += float(pl + cfg.rpo_alpha * (-pc / nc))
            acc += float((pc - rc) > (pr - rr))
    assert abs(float(ls) - want) < 1e-4 * max(1.0, abs(want)), (float(ls), want)
    s = stats["sums"]
    assert s["rewards/accuracy"] == [acc, 2.0]
    assert set(k for k in s if k.startswith("loss/")) == {"loss/shapes", "loss/text"}
    ls.backward()
    assert all(p.grad is None for p in ref.parameters())
    grads = [p.grad for n, p in policy.model.named_parameters() if "language_model" in n]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_reference_equal_to_policy_gives_log2_and_half_margin_zero():
    """At the start of DPO (policy = reference) every sigmoid pair loss is log 2 and every margin 0."""
    policy = tiny("qwen2_5_vl")
    batch = pack(policy.model, dpo_pairs(policy), policy.tokenizer.pad_token_id)
    obj = DPOObjective(Config())
    obj.ref = tiny("qwen2_5_vl").model
    ls, stats = obj.loss_sum(policy.model, batch)
    assert abs(float(ls) - 2 * float(torch.log(torch.tensor(2.0)))) < 1e-5
    assert abs(stats["sums"]["rewards/margin"][0]) < 1e-5
    held_out = obj.evaluate(policy.model, [batch, batch])  # no gradient, sums over the micro-batches
    assert held_out["rewards/accuracy"][1] == 4.0 and abs(held_out["dpo/loss"][0] - 4 * 0.6931472) < 1e-5


def test_precomputed_reference_was_removed_with_a_clear_error():
    """It could not work (record ref_logp never reached the batch; chosen and rejected shared a key)."""
    with pytest.raises(ValueError, match="reference=precomputed was removed.*stage.objective.reference=model"):
        DPOObjective(Config(reference="precomputed"))
    with pytest.raises(ValueError, match=r"stage.objective.reference='ema'; choose one of \['model'\]"):
        DPOObjective(Config(reference="ema"))
    import stages.dpo

    assert not hasattr(stages.dpo, "reference_logps")


def test_a_micro_batch_without_preference_samples_says_the_data_has_none():
    from stages.dpo import pairs

    meta = [{"kind": None, "key": "doc-1", "group": 0}, {"kind": "prompt", "key": "rl-2", "group": 1}]
    with pytest.raises(ValueError, match=r"no preference samples \(sample kinds \['None', 'prompt'\]\).*no "
                                         r"preference records \(chosen/rejected\).*stage.mixture / data.sources"):
        pairs({"meta": meta})


def test_a_pair_split_over_micro_batches_is_an_error():
    policy = tiny("qwen2_vl")
    rows = dpo_pairs(policy)
    batch = pack(policy.model, [[rows[0][0], rows[1][0], rows[1][1]]], policy.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="p0"):
        DPOObjective(Config()).weights(batch)
