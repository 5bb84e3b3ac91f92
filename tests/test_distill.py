"""Distillation (stages/distill.py): the divergences against trl's GKD formula, the chunked loss against a direct
full-logits computation of the two HF models, teacher checks, and the stage: it lowers the divergence and resumes
exactly. Split independence (2 ranks x 2 micro-batches, ZeRO-3's partitioned teacher) is in test_mixed_batches.py."""
from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import metrics_rows, run_stage
from stages.distill import Config, DistillObjective, check_teacher, divergence
from stages.lm import token_weights
from training import models
from training.vlm import VLM


def _trl(student, teacher, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("top_k", [0, 5])
def test_divergence_equals_trl_generalized_jsd(beta, temperature, top_k):
    """trl's batchmean over unmasked tokens = the mean of our per-token values. With top_k, trl is given the two
    models' logits at the teacher's k likeliest tokens (what "restricted and renormalised" means)."""
    g = torch.Generator().manual_seed(int(beta * 10) + top_k)
    B, L, V = 3, 7, 50
    s = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = labels[2, 5:] = -100
    mask = labels != -100
    ours = divergence(s[mask], t[mask], beta, temperature, top_k)
    if top_k:
        idx = t.topk(top_k, -1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    want = _trl(s, t, labels, beta, temperature)
    torch.testing.assert_close(ours.mean(), want, rtol=1e-12, atol=1e-12)
    assert (ours >= -1e-12).all()


def test_divergence_is_zero_for_equal_distributions_and_asymmetric_otherwise():
    z = torch.randn(4, 30, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(divergence(z, z + 3.0, beta), torch.zeros(4, dtype=torch.float64))
    w = torch.randn(4, 30, dtype=torch.float64)
    assert not torch.allclose(divergence(z, w, 0.0), divergence(z, w, 1.0))
    torch.testing.assert_close(divergence(z, w, 0.0), divergence(w, z, 1.0))  # KL(t||s) = reverse KL with roles swapped


# -- the chunked loss of the model step -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """(student, teacher) tiny qwen3_vl bundles of different initialisations, and a packed micro-batch."""
    from tests.dist.fixed_batches import rows_for
    from data.pack import collate

    student = models.build(models.ModelConfig(init_seed=0))
    teacher = models.build(models.ModelConfig(init_seed=1))
    rows, cfg = rows_for(student, ["caption", "vqa", "text"], 2, 256)
    return student, teacher, collate(rows, cfg)


def _objective(teacher, **kw):
    obj = DistillObjective(Config(teacher="unused", **kw))
    obj.teacher, obj.vocab = VLM(teacher.model), teacher.model.config.get_text_config().vocab_size
    return obj


def _direct(student, teacher, batch, cfg: Config, reduction_weights):
    """Σ w·(divergence + ce_weight·CE) from the HF models' full logits (the models' own forward)."""
    kw = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    ids, B, L = batch["input_ids"], *batch["input_ids"].shape
    from data.pack import varlen_inputs

    pos = varlen_inputs(batch, "sdpa_varlen")
    common = dict(input_ids=ids.reshape(1, -1), mm_token_type_ids=batch["mm_token_type_ids"].reshape(1, -1), **kw,
                  **{k: pos[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                         "max_length_k")})
    zs = student.model(**common).logits.view(B, L, -1)[:, :-1].float()
    with torch.no_grad():
        zt = teacher.model(**common).logits.view(B, L, -1)[:, :-1].float()
    target = batch["labels"][:, 1:]
    sup = target != -100
    d = divergence(zs[sup], zt[sup], cfg.jsd_beta, cfg.temperature, cfg.top_k)
    ce = F.cross_entropy(zs[sup], target[sup], reduction="none")
    return ((d + cfg.ce_weight * ce) * reduction_weights[sup]).sum()


@pytest.mark.parametrize("settings", [dict(divergence="forward_kl"),
                                      dict(divergence="jsd", beta=0.3, temperature=1.5, ce_weight=0.5),
                                      dict(divergence="reverse_kl", top_k=8, loss_reduction="sqrt")])
@pytest.mark.parametrize("chunk,fused", [(0, True), (7, True), (7, False)])
def test_chunked_loss_and_gradients_equal_full_logits(pair, settings, chunk, fused):
    """The model step's chunked loss (fused: gradients taken per chunk in the forward; else: chunks recomputed in
    backward, the ZeRO-3 path) equals the loss of the two HF models' full logits, and so do the gradients."""
    student, teacher, batch = pair
    obj = _objective(teacher, **settings)
    w = token_weights(batch["labels"], batch["sample_ids"], obj.cfg.loss_reduction)
    student.model.zero_grad()
    want = _direct(student, teacher, batch, obj.cfg, w)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}
    student.model.zero_grad()
    step = VLM(student.model, chunk)
    with torch.no_grad():
        hidden, _ = obj.teacher(batch, hidden=True)
    from training.vlm import _chunks, _supervised, chunked_loss

    states, zero = step.hidden_states(batch)
    sup, h, t = _supervised(states, batch["labels"])
    n = _chunks(len(t), step.loss_chunk, h.device, None)
    got, per_token, stats = chunked_loss(step.lm_head, h, t, w[sup].float(), n, step.loss_chunk,
                                         obj.loss_fn(hidden), fused=fused)
    (got + zero).backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert per_token.shape == (len(t),) and stats.shape == (len(t), 4)
    for name, g in want_grads.items():
        p = dict(student.model.named_parameters())[name]
        # float32 round-off relative to the tensor's own gradient scale (the ViT's are ~1e-4 of lm_head's)
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=lambda m: f"{name}: {m}")


def test_model_step_returns_the_objective_sums(pair):
    """VLM.forward(loss_fn=...) is the step's entry: the same value as chunked_loss, per-token losses scattered back
    to [B, L-1], and the metrics sum to what the stats say."""
    student, teacher, batch = pair
    obj = _objective(teacher, divergence="forward_kl")
    batch = dict(batch, weights=obj.weights(batch))
    with torch.no_grad():
        loss, sums = obj.loss_sum(VLM(student.model), batch)
    n = float((batch["labels"][:, 1:] != -100).sum())
    assert sums["sums"]["distill/divergence"][1] == n
    kl = sums["sums"]["distill/divergence"][0]
    torch.testing.assert_close(loss.double(), torch.tensor(kl, dtype=torch.float64), rtol=1e-5, atol=0)  # token weights 1
    per_source = sum(v[0] for k, v in sums["sums"].items() if k.startswith("loss/"))
    assert per_source == pytest.approx(kl, rel=1e-5)
    assert 0 <= sums["sums"]["distill/acc_student"][0] <= n


@pytest.fixture(scope="module")
def chats(pair):
    """A packed micro-batch of vqa chats (image, question, one-word answer) and their records."""
    from tests.dist.fixed_batches import rows_for
    from data.pack import collate

    rows, cfg = rows_for(pair[0], ["vqa"], 1, 256)
    return collate(rows, cfg)


def test_on_policy_step_continues_the_records_generation_prompts_and_scores_them_directly(pair, chats):
    """An on-policy step: each chat's prompt is exactly its messages without the reply, rendered with the
    generation prompt (as an RL prompt record encodes them); the completions are the student's (labels on them
    only); the loss on them equals the full-logits computation of the two HF models on those rows."""
    from data import shapes
    from data.encode import EncoderConfig, build_encoder

    student, teacher, _ = pair
    obj = _objective(teacher, lmbda=1.0, max_new_tokens=5, rollout_temperature=0.0)
    assert obj.cfg.divergence == "reverse_kl"  # the on-policy default
    obj.tokenizer = student.tokenizer
    step = VLM(student.model)
    torch.manual_seed(0)
    (mb,) = obj.prepare(step, [chats])
    enc = build_encoder(EncoderConfig(), student)
    n = len(chats["sources"])
    assert len(mb["sources"]) == n and obj.step_sums()["distill/on_policy"] == [1.0, 1.0]
    for i in range(n):
        record, media = shapes.generate(shapes.ShapesConfig(), "vqa", i)
        rl = {"messages": record["messages"][:-1], "answer": "x", "reward": "exact_match"}
        (want,) = enc.encode(dict(key=f"p{i}", source="vqa", record=rl, media=media))
        row = mb["input_ids"][i][mb["attention_mask"][i].bool()]
        P = len(want["input_ids"])
        assert torch.equal(row[:P], want["input_ids"]), i
        assert (mb["labels"][i, :P] == -100).all() and torch.equal(mb["labels"][i, P:len(row)], row[P:])
    mb["weights"] = obj.weights(mb)
    loss, sums = obj.loss_sum(step, mb)
    kw = {k: mb[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "attention_mask")}
    zs = student.model(input_ids=mb["input_ids"], **kw).logits[:, :-1].float()
    with torch.no_grad():
        zt = teacher.model(input_ids=mb["input_ids"], **kw).logits[:, :-1].float()
    sup = mb["labels"][:, 1:] != -100
    want = divergence(zs[sup], zt[sup], 1.0).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert sums["sums"]["distill/divergence"][1] == float(sup.sum())


def test_on_policy_skips_documents_and_draws_the_same_steps_everywhere():
    from data.errors import BadSample

    obj = DistillObjective(Config(teacher="x", lmbda=0.5, seed=3))
    with pytest.raises(BadSample, match="no_prompt"):
        obj.check_sample({"key": "doc", "labels": torch.tensor([5, 6, 7])})
    obj.check_sample({"key": "chat", "labels": torch.tensor([-100, 6, 7])})
    draws = [obj.on_policy(s) for s in range(8)]
    assert draws == [DistillObjective(Config(teacher="x", lmbda=0.5, seed=3)).on_policy(s) for s in range(8)]
    assert draws == [False, True, False, False, True, True, True, False]
    assert not any(DistillObjective(Config(teacher="x")).on_policy(s) for s in range(8))


# -- teacher checks --------------------------------------------------------------------------------------------------
def test_teacher_of_another_family_or_tokenizer_is_refused_naming_the_difference(pair):
    student, teacher, _ = pair
    check_teacher(student, teacher)  # same family, same tokenizer: fine
    other = models.build(models.ModelConfig(name="tiny_qwen2_5_vl", family="qwen2_5_vl"))
    with pytest.raises(ValueError, match="'qwen2_5_vl' model but the student is 'qwen3_vl'"):
        check_teacher(student, other)
    t2 = copy.copy(teacher)
    t2.tokenizer = copy.deepcopy(teacher.tokenizer)
    t2.tokenizer.chat_template = teacher.tokenizer.chat_template.replace("assistant", "helper", 1)
    with pytest.raises(ValueError, match="chat templates differ at line"):
        check_teacher(student, t2)
    t2.tokenizer = copy.deepcopy(teacher.tokenizer)
    t2.tokenizer.add_tokens(["<extra_teacher_token>"])
    with pytest.raises(ValueError, match="'<extra_teacher_token>'.*teacher's vocabulary only"):
        check_teacher(student, t2)


def test_held_out_teacher_kl_is_zero_for_the_teacher_itself(pair):
    from training.evaluate import EvalConfig, teacher_kl

    student, teacher, _ = pair
    cfg = EvalConfig(samples=3)
    assert teacher_kl(teacher, teacher, cfg) == pytest.approx(0.0, abs=1e-6)
    assert teacher_kl(student, teacher, cfg) > 0.01


def test_a_student_can_start_with_its_teachers_vit(tmp_path):
    """model.groups_from: the small student's vision group is the export's, bit for bit; its merger (another output
    width) and LLM keep their own init; a group whose shapes differ is refused."""
    from safetensors.torch import load_file

    run_stage(tmp_path, ["trainer.max_steps=0", "model.init_seed=5"])
    export = load_file(str(tmp_path / "hf" / "model.safetensors"))
    cfg = models.ModelConfig(name="small", tiny={"text": {"hidden_size": 96, "num_attention_heads": 3,
                                                           "num_key_value_heads": 1}, "vision": {"out_hidden_size": 96}},
                             groups_from={"path": str(tmp_path / "hf"), "groups": ["vision"]})
    small = dict(models.build(cfg).model.named_parameters())
    vision = [n for n in small if n.startswith("model.visual.") and models.group_of(n, models.FAMILIES["qwen3_vl"]) == "vision"]
    assert vision and all(torch.equal(small[n], export[n]) for n in vision)
    assert not torch.equal(small["model.visual.merger.linear_fc1.weight"][:1], export["model.visual.merger.linear_fc1.weight"][:1])
    with pytest.raises(ValueError, match="other shapes"):
        models.build(dataclasses.replace(cfg, groups_from={"path": str(tmp_path / "hf"), "groups": ["merger"]}))


def test_config_refusals():
    with pytest.raises(ValueError, match="stage.objective.teacher is not set"):
        Config().check()
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        Config(teacher="x", divergence="jsd", beta=1.0).check()
    with pytest.raises(ValueError, match="divergence='kl'"):
        Config(teacher="x", divergence="kl").check()


# -- the stage --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher: the tiny qwen3_vl (another seed) after a short SFT, exported."""
    out = tmp_path_factory.mktemp("teacher")
    run_stage(out, ["stage=sft", "model.init_seed=1", "trainer.max_steps=8", "stage.optimizer.lr=2e-3",
                    "trainer.save_every=0", "data.shapes.tasks=[vqa]"])
    return out / "hf"


DISTILL = ["stage=distill", "data.shapes.tasks=[vqa]", "stage.optimizer.lr=2e-3", "trainer.micro_batch_size=1"]


@pytest.mark.slow
def test_distill_stage_lowers_the_divergence_and_resumes_exactly(tmp_path, teacher_dir, caplog):
    """lmbda 0.5 (seed 3: steps 2, 5, 6, 7 on-policy, the others on the dataset's responses): the divergence on the
    dataset's responses falls from step 1 to step 8; a run restarted from its step-4 checkpoint draws the same
    steps on-policy, samples the same completions, logs the same metrics from step 5 on and exports
    bit-identical weights."""
    from test_preference_dist import _assert_resumed_identically, _rewind

    ref, out = tmp_path / "ref", tmp_path / "resumed"
    common = DISTILL + [f"stage.objective.teacher={teacher_dir}", "trainer.max_steps=8", "trainer.save_every=4",
                        "trainer.keep_checkpoints=10", "stage.objective.ce_weight=0.1", "stage.objective.lmbda=0.5",
                        "stage.objective.seed=3", "stage.objective.max_new_tokens=4"]
    run_stage(ref, common)
    rows = metrics_rows(ref)
    assert [r["distill/on_policy"] for r in rows] == [0, 1, 0, 0, 1, 1, 1, 0]
    assert {"distill/divergence", "distill/ce", "distill/acc_student", "distill/acc_teacher", "loss/vqa"} <= rows[0].keys()
    assert all("rollout/response_length" in r for r in rows if r["distill/on_policy"])
    first, last = rows[0]["distill/divergence"], rows[-1]["distill/divergence"]
    assert last < 0.7 * first, (first, last)
    assert rows[-1]["distill/acc_teacher"] > 0.2  # the SFT teacher answers some shapes questions
    _rewind(ref, out, 4)
    with caplog.at_level(logging.INFO, logger="training"):
        run_stage(out, common)
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in caplog.text
    _assert_resumed_identically(ref, out, 4)


def test_the_teacher_is_loaded_without_the_students_architecture_changes_or_start():
    """model.tiny and model.groups_from describe the student; the teacher (Context.frozen) is its own checkpoint."""
    from training.loop import frozen_model_config

    student = models.ModelConfig(name="tiny_qwen3_vl_small", tiny={"text": {"num_hidden_layers": 2}}, dtype="bfloat16",
                                 groups_from={"path": "/runs/sft/hf", "groups": ["vision"]}, gradient_checkpointing=True)
    t = frozen_model_config(student, "/runs/sft/hf")
    assert (t.path, t.tiny, t.groups_from, t.gradient_checkpointing, t.dtype) == \
        ("/runs/sft/hf", {}, {"path": None, "groups": []}, False, "bfloat16")
