"""Precomputed teacher outputs (data/teacher.py, training/teacher_outputs.py, stage.objective.teacher=precomputed):
the stored top-k reproduce the co-hosted teacher's loss; a member that does not fit its sample is skipped and
counted, never trusted."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import compose, metrics_rows, run_stage
from data import teacher as stored
from data.encode import IGNORE, build_encoder
from data.errors import BadSample
from data.pack import PackConfig, collate
from data.pipeline import source_configs
from data.rope import RopeSpec, attach
from stages.distill import Config, DistillObjective, divergence, divergence_topk
from training import models
from training.teacher_outputs import main, shard_samples
from training.train import to_job

VQA = ["stage=distill", "data.shapes.tasks=[vqa]", "stage.seq_len=256"]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_stored_top_k_log_probs_give_the_top_k_divergence_of_the_logits(beta, temperature):
    """log-probs at temperature 1 (the logits shifted by a constant per row) stored for k tokens: the divergence
    over the first k' <= k of them equals `divergence(..., top_k=k')` of the full logits at any temperature."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=g) * 2, torch.randn(7, 50, generator=g) * 3
    top = torch.log_softmax(t, -1).topk(12, dim=-1)
    for k in (1, 5, 12):
        want = divergence(s, t, beta, temperature, top_k=k)
        got = divergence_topk(s, top.indices[:, :k], top.values[:, :k], beta, temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def chat():
    """The tiny qwen3_vl bundle, its encoder and rope spec, and one raw vqa record (with an image) from the
    shapes cache."""
    job = to_job(compose(VQA))
    bundle = models.build(job.model)
    src = source_configs(job.data, None)[0]
    raw = next(iter(shard_samples(str(src.urls[0] if isinstance(src.urls, list) else src.urls), "vqa", {})))
    return bundle, build_encoder(job.data.encoder, bundle), RopeSpec.from_config(bundle.model.config), raw


def _member(sample, ids=None, logps=None, targets=None, input_ids=None, k=4):
    t = stored.targets_of(sample["labels"], IGNORE)
    n = len(t)
    ids = torch.arange(n * k).view(n, k) % 50 if ids is None else ids
    logps = -torch.rand(n, k) if logps is None else logps
    return stored.dump(ids, logps, t if targets is None else targets,
                       sample["input_ids"] if input_ids is None else input_ids, "test")


def test_a_member_is_attached_when_it_fits_its_sample_and_refused_otherwise(chat):
    bundle, encoder, _, raw = chat
    sample = encoder.encode(raw)[0]
    n = len(stored.targets_of(sample["labels"], IGNORE))
    assert n > 0 and "teacher_ids" not in sample
    got = encoder.encode({**raw, "media": {**raw["media"], stored.MEMBER: _member(sample)}})[0]
    assert got["teacher_ids"].shape == (n, 4) and got["teacher_logps"].dtype == torch.float32
    other = sample["input_ids"].clone()
    other[3] += 1
    bad_targets = stored.targets_of(sample["labels"], IGNORE).clone()
    bad_targets[-1] += 1
    cases = {
        "teacher_outputs_mismatch": [_member(sample, input_ids=other), _member(sample, targets=bad_targets),
                                     _member(sample, input_ids=sample["input_ids"][:-1])],
        "bad_teacher_outputs": [b"not a safetensors file", pickle.dumps({"ids": [1]}),
                                _member(sample, ids=torch.full((n, 4), len(bundle.tokenizer))),
                                _member(sample, logps=torch.ones(n, 4)),
                                _member(sample, logps=torch.full((n, 4), float("nan")))],
    }
    for reason, members in cases.items():
        for data in members:
            with pytest.raises(BadSample) as err:
                encoder.encode({**raw, "media": {**raw["media"], stored.MEMBER: data}})
            assert err.value.reason == reason and stored.MEMBER in err.value.detail, err.value
    assert "python -m training.teacher_outputs" in str(err.value) or reason == "bad_teacher_outputs"
    pref = {**raw, "record": {"messages": raw["record"]["messages"][:1], "chosen": "a", "rejected": "b"},
            "media": {**raw["media"], stored.MEMBER: _member(sample)}}
    with pytest.raises(BadSample, match="chat or document records only"):
        encoder.encode(pref)


def test_collate_keeps_the_model_steps_order_of_targets_and_cuts_truncated_samples(chat):
    """Two samples in one row and a truncated third in another: the batch's teacher rows are the stored rows of
    each supervised target the model step scores, in its order (row-major over labels[:, 1:])."""
    _, encoder, spec, raw = chat
    samples = []
    for i in range(3):
        s = encoder.encode(raw)[0]
        n = len(stored.targets_of(s["labels"], IGNORE))
        ids = torch.arange(n).unsqueeze(1).repeat(1, 3) + 1000 * i  # row r of sample i holds 1000 i + r
        samples.append(attach(spec, {**s, "teacher_ids": ids, "teacher_logps": -ids.float()}))
    from data.pack import _truncate

    cut = len(samples[2]["input_ids"]) - 2  # drops its last two tokens (<|im_end|> and the newline after it)
    samples[2] = _truncate(samples[2], cut)
    L = 2 * len(samples[0]["input_ids"])
    batch = collate([samples[:2], samples[2:]], PackConfig(seq_len=L, pad_id=0))
    target = batch["labels"][:, 1:]
    sup = target != IGNORE
    owner = batch["sample_ids"][:, 1:][sup]
    assert len(batch["teacher_ids"]) == int(sup.sum())
    rank_in_sample = torch.cat([torch.arange(int((owner == i).sum())) for i in range(3)])
    torch.testing.assert_close(batch["teacher_ids"][:, 0], 1000 * owner + rank_in_sample)
    left = len(stored.targets_of(samples[2]["labels"], IGNORE))
    assert int((owner == 2).sum()) == left < int((owner == 0).sum())  # the truncated sample keeps its first rows


def test_precomputed_config_and_sample_checks():
    with pytest.raises(ValueError, match="needs top_k >= 1"):
        Config(teacher="precomputed").check()
    with pytest.raises(ValueError, match="on-policy samples need a live teacher"):
        Config(teacher="precomputed", top_k=4, lmbda=0.5).check()
    obj = DistillObjective(Config(teacher="precomputed", top_k=4))
    with pytest.raises(BadSample) as err:
        obj.check_sample({"key": "k", "labels": torch.tensor([IGNORE, 5])})
    assert err.value.reason == "no_teacher_outputs" and "python -m training.teacher_outputs" in err.value.detail
    with pytest.raises(BadSample) as err:
        obj.check_sample({"key": "k", "teacher_ids": torch.zeros(2, 3, dtype=torch.long),
                          "teacher_logps": torch.zeros(2, 3)})
    assert err.value.reason == "teacher_outputs_top_k"
    s = {"key": "k", "teacher_ids": torch.arange(12).view(2, 6), "teacher_logps": -torch.arange(12.).view(2, 6)}
    obj.check_sample(s)
    assert s["teacher_ids"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]] and s["teacher_logps"].shape == (2, 4)


@pytest.mark.slow
def test_stored_outputs_train_exactly_as_the_co_hosted_teacher(tmp_path, capsys):
    """The command writes the vqa shards with a (random, other-seed) teacher's top-16; a distill stage on them
    with teacher=precomputed and top_k 8 logs the same losses, divergences and teacher accuracies, step by step,
    as the same stage with the teacher loaded (and its top_k 8), on the same samples in the same order."""
    teacher = tmp_path / "teacher"
    run_stage(teacher, ["model.init_seed=1", "trainer.max_steps=0"])
    job = to_job(compose(VQA))
    assert main(["--teacher", str(teacher / "hf"), "--out", str(tmp_path / "shards"), "--top-k", "16",
                 "--batch-tokens", "300", "--", *VQA]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    src = source_configs(job.data, None)[0]
    urls = src.urls if isinstance(src.urls, list) else [src.urls]
    assert counts["written"] > 0 and set(counts) == {"written"}, counts
    outs = [str(tmp_path / "shards" / u.split("/")[-1]) for u in urls]
    sources = (f"+data.sources=[{{name: vqa, urls: [{', '.join(repr(u) for u in outs)}], weight: {src.weight}, "
               f"shuffle_buffer: {src.shuffle_buffer}, seed: {src.seed}}}]")
    common = [*VQA, "stage.optimizer.lr=2e-3", "trainer.micro_batch_size=1", "trainer.max_steps=3",
              "trainer.save_every=0", "stage.objective.top_k=8", "stage.objective.ce_weight=0.1"]
    run_stage(tmp_path / "live", [*common, f"stage.objective.teacher={teacher / 'hf'}"])
    run_stage(tmp_path / "stored", [*common, "stage.objective.teacher=precomputed", "data.name=shards", sources])
    live, pre = metrics_rows(tmp_path / "live"), metrics_rows(tmp_path / "stored")
    assert len(live) == len(pre) == 3
    for a, b in zip(live, pre):
        for key in ("loss", "distill/divergence", "distill/ce", "distill/acc_student", "distill/acc_teacher",
                    "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
    assert not any(k.startswith("skipped/") for k in pre[-1]), pre[-1]
