"""engine=megatron (training/engines/megatron.py): the same stages on megatron-core's tensor-parallel decoder.

Against the DeepSpeed engine as the reference: the same fixed global batches give the same losses and weights
with TP=2 under torchrun as with zero2 in one process; a stage's export loads with plain from_pretrained; a
killed-and-resumed run equals an uninterrupted one; what the engine does not run yet is refused by name.
(The decoder itself against HF's: tests/test_mcore.py.)
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import compose, load_hf, metrics_rows, run_stage
from tests.test_mixed_batches import _assert_same, _run

MEGATRON = ["engine=megatron", "trainer.save_every=0"]


@pytest.mark.slow
def test_dp2_x_tp2_with_sequence_parallelism_trains_the_same_global_batches_as_zero2_on_one_rank(tmp_path):
    """Qwen3-VL (DeepStack, images) on s1 for 3 steps: megatron with TP=2 x DP=2 (4 processes; each replica's two
    TP ranks read the same rows, the replicas' gradients summed over the data-parallel group only) and
    engine.sequence_parallel (each TP rank's layers on half of the row; rows of 255 tokens, so the engine pads one)
    against DeepSpeed zero2 in one process with the same global batches (4 rows a step). Plain TP: the TP 2 x PP 2
    case below and the recipe's DPO."""
    opts = dict(family="qwen3_vl", attention="varlen", tasks="caption,vqa,text", seq_len="255")
    ref = _run(tmp_path / "zero2", 1, engine="zero2", **opts)
    tp2 = _run(tmp_path / "tp2", 4, engine="megatron", tp="2", seqpar="true", **opts)
    _assert_same(tp2, ref, atol=2e-5)
    rows = metrics_rows(tmp_path / "tp2")
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in metrics_rows(tmp_path / "zero2")],
                                                           rel=1e-4)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in metrics_rows(tmp_path / "zero2")]  # counted once


@pytest.mark.slow
@pytest.mark.parametrize("nproc,family,tp,vpp", [(2, "qwen3_vl", 1, 2), (4, "qwen2_5_vl", 1, 1), (4, "qwen3_vl", 2, 1)],
                         ids=["pp2_x_vpp2", "dp2_x_pp2", "tp2_x_pp2_sp"])
def test_pipeline_parallel_trains_the_same_global_batches_as_zero2_on_one_rank(tmp_path, nproc, family, tp, vpp):
    """engine.pp=2: megatron's 1F1B schedule over each step's micro-batches (4 per replica at dp 1, 2 at dp 2), the
    first stage running the ViT and merge (Qwen3-VL's DeepStack features carried to the later stages' layers),
    the last the loss; the loss and token counts reach every rank, gradients are summed over the data-parallel
    group, the norm over the stages. engine.vpp=2: the interleaved schedule over two one-layer chunks a rank (the
    first rank's second chunk is a middle stage: no ViT there); its held-out calls, one micro-batch each, are
    padded to pp. TP 2 x PP 2 with sequence parallelism: each TP rank sends its half of the row (and of the carried
    DeepStack features) between the stages. Losses, grad norms, counts and the exported weights (gathered over both
    stages and TP) equal zero2 in one process on the same global batches."""
    opts = {"family": family, "attention": "varlen", "tasks": "caption,vqa,text", "stage.eval.every": "2",
            "stage.eval.sources": "[vqa,caption]", "stage.eval.samples": "5"}  # held-out: forward-only schedules
    ref = _run(tmp_path / "zero2", 1, engine="zero2", micro=4, **opts)
    pp = _run(tmp_path / "pp", nproc, engine="megatron", pp="2", tp=str(tp), vpp=str(vpp),
              seqpar=str(tp > 1).lower(), **opts)
    _assert_same(pp, ref, atol=3e-5)
    rows, want = metrics_rows(tmp_path / "pp"), metrics_rows(tmp_path / "zero2")
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)
    def held_out(rs):
        return [v for r in rs if "eval/loss" in r for v in (r["step"], r["eval/loss/vqa"], r["eval/loss/caption"])]

    assert held_out(want)[::3] == [2, 3] and held_out(rows) == pytest.approx(held_out(want), rel=1e-5)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in want]  # counted once per replica


@pytest.mark.slow
def test_a_pipelined_run_resumes_bit_identically_and_exports_a_plain_hf_model(tmp_path):
    """pp=2 x vpp=2 under torchrun: 4 steps with checkpoints at 2 and 4 (one file per stage, its two chunks); a
    run restarted from step 2
    logs the same steps 3-4 and ends with the same weights. The export and a next stage's start from the
    checkpoint directory (checkpoint_weights: both stages' files merged) are the same HF weights."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_preference_dist import _assert_resumed_identically, _rewind

    from tests.conftest import REPO, SHORT_ROWS, clean_env
    from training.engine import checkpoint_weights

    def run(out):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                            "training.train", f"output_dir={out}", "logger=none", SHORT_ROWS, "stage=sft",
                            "model=tiny_qwen3_vl", "engine=megatron", "engine.pp=2", "engine.vpp=2", "trainer.max_steps=4",
                            "trainer.save_every=2", "trainer.keep_checkpoints=5", "trainer.grad_accum=2"],
                           cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]

    ref, out = tmp_path / "ref", tmp_path / "resumed"
    run(ref)
    assert {f.name for f in (ref / "checkpoints" / "step_00000004").glob("mcore_rank*.pt")} == \
        {"mcore_rank00000.pt", "mcore_rank00001.pt"}
    _rewind(ref, out, 2)
    run(out)
    _assert_resumed_identically(ref, out, 2)
    exported = load_file(str(ref / "hf" / "model.safetensors"))
    from_ckpt = checkpoint_weights(ref / "checkpoints" / "step_00000004")
    assert exported.keys() == from_ckpt.keys() and all(torch.equal(exported[k], from_ckpt[k]) for k in exported)
    assert load_hf(ref / "hf").keys() == exported.keys()


@pytest.mark.slow
def test_expert_parallel_moe_trains_the_same_global_batches_as_zero2_on_one_rank(tmp_path):
    """The tiny Qwen3-VL MoE on megatron with its 4 experts split over 2 ranks (engine.ep=2: megatron's MoE layer,
    tokens dispatched all-to-all to the rank holding their experts), 2 micro-batches per rank, with the
    global-batch load-balancing loss (training/moe.py on the megatron routers' outputs, its routing pass first):
    losses, the aux loss, grad norms and the exported weights (both ranks' experts merged) equal zero2 in one
    process."""
    opts = {"family": "qwen3_vl_moe", "attention": "varlen", "tasks": "caption,vqa,text",
            "stage.moe.aux_loss_coef": "0.2"}
    ref = _run(tmp_path / "zero2", 1, engine="zero2", micro=4, **opts)
    ep = _run(tmp_path / "ep", 2, engine="megatron", ep="2", **opts)
    _assert_same(ep, ref, atol=1e-4)  # routed experts: a tenth of one Adam step (lr 1e-3)
    rows, want = metrics_rows(tmp_path / "ep"), metrics_rows(tmp_path / "zero2")
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)


@pytest.mark.parametrize("model,stage", [(m, s) for m in ("tiny_qwen2_5_vl", "tiny_qwen3_vl_moe")
                                         for s in ("s1_multimodal", "dpo", "distill", "sapo")])
def test_a_stage_on_megatron_equals_zero2_and_exports_a_plain_hf_model(tmp_path, model, stage):
    """One process, tp 1, qwen2_5_vl (QKV bias) and the Qwen3-VL MoE (megatron's MoE layer, the aux loss from
    its routers): the logged losses and grad norms of 3 steps equal zero2's (DPO with its frozen reference,
    distillation with its frozen teacher placed by the engine and on-policy steps, SAPO with its rollouts:
    generation by the HF decoder given the megatron weights), and hf/ loads with from_pretrained and holds the
    same weights as zero2's export."""
    common = [f"model={model}", f"stage={stage}", "trainer.max_steps=3", "trainer.save_every=0"]
    if stage in ("dpo", "sapo"):
        common.append("stage.mixture={preference: 1}" if stage == "dpo" else "stage.mixture={rl: 1}")
    if stage == "sapo":
        common += ["stage.objective.num_generations=2", "stage.objective.max_new_tokens=8",
                   "trainer.micro_batch_size=2"]
    if stage == "distill":
        run_stage(tmp_path / "teacher", [f"model={model}", "model.init_seed=1", "trainer.max_steps=0"])
        common += [f"stage.objective.teacher={tmp_path / 'teacher'}", "stage.objective.top_k=8",
                   "stage.objective.lmbda=0.5", "stage.objective.seed=3", "stage.objective.max_new_tokens=4"]
    run_stage(tmp_path / "zero2", [*common, "engine=zero2"])
    run_stage(tmp_path / "mg", [*common, "engine=megatron"])
    a, b = metrics_rows(tmp_path / "zero2"), metrics_rows(tmp_path / "mg")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)  # float32 round-off
    # DPO's rewards are beta x differences of sequence log-probs (sums of ~100 float32 terms): round-off ~1e-6
    objective = [k for k in a[-1] if k.startswith(("dpo/", "distill/", "rewards/", "reward/", "rl/", "rollout/",
                                                   "moe/aux_loss", "moe/load_entropy"))]
    assert (objective or stage == "s1_multimodal") and all(b[-1][k] == pytest.approx(a[-1][k], rel=1e-5, abs=1e-6) for k in objective), \
        [(k, a[-1][k], b[-1][k]) for k in objective]
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)
    wa, wb = load_hf(tmp_path / "zero2" / "hf"), load_hf(tmp_path / "mg" / "hf")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-5, msg=k)


def _pp2_equals_zero2(tmp_path, common: list, prefixes: tuple) -> list:
    """Runs the stage `common` describes on zero2 in one process and on megatron at engine.pp=2 under torchrun (one
    replica of two stages); every step's metrics starting with `prefixes` (zero2's last row names them) and the
    exports agree. Returns zero2's rows."""
    import sys

    from tests.conftest import cli

    run_stage(tmp_path / "zero2", [*common, "engine=zero2"])
    p = cli([f"output_dir={tmp_path / 'pp'}", "logger=none", *common, "engine=megatron", "engine.pp=2"],
            launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = metrics_rows(tmp_path / "zero2"), metrics_rows(tmp_path / "pp")
    keys = [k for k in a[-1] if k.startswith(prefixes)]
    for ra, rb in zip(a, b, strict=True):
        assert {k: rb.get(k) for k in keys if k in ra} == pytest.approx({k: ra[k] for k in keys if k in ra},
                                                                        rel=1e-5, abs=1e-6)
    wa, wb = load_hf(tmp_path / "zero2" / "hf"), load_hf(tmp_path / "pp" / "hf")
    assert wa.keys() == wb.keys() and all(torch.allclose(wb[k], wa[k], rtol=0, atol=2e-5) for k in wa)
    return a


@pytest.mark.slow
def test_dpo_on_a_pipeline_equals_zero2(tmp_path):
    """engine.pp=2 under torchrun (one replica of two stages): DPO's frozen reference runs a forward-only schedule of
    its own over the step's micro-batches before the policy's 1F1B (Objective.frozen_pass), and before each
    held-out call. Losses, pair metrics, grad norms, held-out scores and the export equal zero2 in one process."""
    common = ["model=tiny_qwen2_5_vl", "stage=dpo", "stage.mixture={preference: 1}", "trainer.max_steps=3",
              "trainer.save_every=0", "trainer.grad_accum=2", "stage.eval.every=2", "stage.eval.samples=4",
              "stage.eval.sources=[preference]", "stage.optimizer.lr=1e-4", "stage.schedule.warmup_ratio=0"]
    a = _pp2_equals_zero2(tmp_path, common, ("loss", "dpo/", "rewards/", "logps/", "grad_norm", "eval/"))
    assert "eval/loss" in a[-1] and "rewards/margin" in a[-1]


@pytest.mark.slow
def test_sapo_on_a_pipeline_equals_zero2(tmp_path):
    """engine.pp=2 under torchrun (one replica of two stages), with the reference's KL: every stage generates with
    the gathered whole decoder and takes the first stage's rollouts; the rollout policy's and the reference's
    log-probs are forward-only schedules; the rollouts (padded rows of each micro-batch's own length) train one
    schedule per shape. Losses, rewards, policy metrics, grad norms and the export equal zero2 in one process."""
    common = ["model=tiny_qwen2_5_vl", "stage=sapo", "stage.mixture={rl: 1}", "trainer.max_steps=3",
              "trainer.save_every=0", "stage.objective.num_generations=2", "stage.objective.max_new_tokens=8",
              "trainer.micro_batch_size=2", "trainer.grad_accum=2", "stage.objective.kl_beta=0.04",
              "stage.objective.drop_equal_groups=false"]  # the tiny policy's groups may score alike: train anyway
    a = _pp2_equals_zero2(tmp_path, common, ("loss", "reward/", "rollout/", "policy/", "grad_norm"))
    assert any(k.startswith("policy/") for k in a[-1]) and all(r["loss"] is not None for r in a), a[-1]


@pytest.mark.slow
def test_distillation_on_a_pipeline_equals_zero2(tmp_path):
    """engine.pp=2 under torchrun: the teacher's hidden states come from its own forward-only schedule before the
    student's (Objective.frozen_pass), kept on the last stage where the student's loss runs; on-policy steps
    generate on both stages (lmbda 0.5: seed 3 draws both kinds in 3 steps) and train their padded rows one
    schedule per shape. Losses, distillation metrics, grad norms and the export equal zero2 in one process."""
    run_stage(tmp_path / "teacher", ["model=tiny_qwen2_5_vl", "model.init_seed=1", "trainer.max_steps=0"])
    common = ["model=tiny_qwen2_5_vl", "stage=distill", "trainer.max_steps=3", "trainer.save_every=0",
              f"stage.objective.teacher={tmp_path / 'teacher'}", "stage.objective.top_k=8",
              "stage.objective.lmbda=0.5", "stage.objective.seed=3", "stage.objective.max_new_tokens=4",
              "trainer.grad_accum=2"]
    a = _pp2_equals_zero2(tmp_path, common, ("loss", "distill/", "rollout/", "grad_norm"))
    assert {r["distill/on_policy"] for r in a} == {0.0, 1.0}


def test_killed_megatron_run_resumes_bit_identically_and_a_changed_layout_is_refused(tmp_path):
    """4 steps with a checkpoint at 2; a run restarted from it logs the same steps 3-4 and ends with the same
    weights as the uninterrupted one. A checkpoint written with another tp is refused naming it."""
    from test_preference_dist import _assert_resumed_identically, _rewind

    common = [*MEGATRON, "stage=sft", "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=5"]
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    run_stage(ref, common)
    _rewind(ref, out, 2)
    run_stage(out, common)
    _assert_resumed_identically(ref, out, 2)
    f = out / "checkpoints" / "step_00000002" / "mcore_rank00000.pt"
    state = torch.load(f, weights_only=True)
    state["layout"]["tp"] = 2
    torch.save(state, f)
    again = tmp_path / "again"
    _rewind(out, again, 2)
    with pytest.raises(ValueError, match=r"written with \{'tp': 2.*changed: \{'tp': \(2, 1\)\}"):
        run_stage(again, common)


def test_what_megatron_does_not_run_yet_is_refused_by_name():
    from training.train import check_job, to_job

    def refused(overrides, world=1):
        with pytest.raises(ValueError) as err:
            check_job(to_job(compose(["engine=megatron", *overrides])), world)
        return str(err.value)

    assert "engine.tp=1 x engine.pp=2 must divide the 1 processes" in refused(["engine.pp=2"])
    assert "4 decoder layers must split evenly" in refused(["engine.pp=3"], world=3)
    assert "4 decoder layers must split evenly" in refused(["engine.pp=2", "engine.vpp=3"], world=2)
    assert "interleaved schedule needs at least engine.pp=2 micro-batches" in refused(["engine.pp=2", "engine.vpp=2"], 2)
    assert "need engine.pp > 1" in refused(["engine.vpp=2"])
    assert "it needs engine.tp > 1" in refused(["engine.sequence_parallel=true"])
    assert "engine.tp=2 x engine.pp=1 must divide the 1 processes" in refused(["engine.tp=2"])
    assert "engine.tp=4 must divide num_attention_heads=6" in refused(["engine.tp=4"], world=4)
    assert "stage.lora" in refused(["stage=sft", "stage.lora.r=4"])
    assert "parallel.sp_size" in refused(["parallel.sp_size=2"], world=2)
    assert "model.attn_implementation" in refused(["model.attn_implementation=sdpa"])
    with pytest.raises(ValueError, match="engine=megatron's"):
        check_job(to_job(compose(["engine=zero2", "+engine.tp=2"])), 2)


def test_vocab_parallel_cross_entropy_and_its_gradients_equal_torch(tmp_path):
    """training/mcore/loss.py on one rank against F.cross_entropy of the plain logits, the padded columns past the
    vocabulary excluded, in chunks of 5 of 13 tokens (TP 2: the DP 2 x TP 2 training test above)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from training.mcore.loss import VocabParallelNLL

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        V, Vp, H, N = 37, 40, 8, 13
        h = torch.randn(N, H, generator=g, requires_grad=True)
        weight = torch.randn(Vp, H, generator=g, requires_grad=True)
        target, w = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g)
        loss, ce = VocabParallelNLL.apply(h, weight, target, w, 5, V, dist.group.WORLD)
        loss.backward()
        h2, w2 = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        want = F.cross_entropy(h2 @ w2[:V].t(), target, reduction="none")
        (want * w).sum().backward()
        torch.testing.assert_close(ce, want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(weight.grad[V:], torch.zeros(Vp - V, H))
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.slow
def test_the_tiny_recipe_runs_every_stage_on_megatron_with_pipeline_and_tensor_parallelism(tmp_path):
    """pipeline=tiny on engine=megatron under torchrun (2 processes): the lm stages (S0, S2, S3, SFT), DPO (its
    reference on its own schedule), the small distillation student (its teacher, the SFT export, on its own
    schedule; on-policy steps generate) and its SFT twin pipelined over 2 stages (engine.pp=2), S1 on DeepSpeed as
    one Ulysses SP group of 2 (engines mixed per step: S2 starts from a DeepSpeed export, S1 from a megatron one),
    SAPO tensor-parallel with sequence parallelism (engine.tp=2; padded rollout rows of any length, padded to a
    multiple of 2); each step starts from the one before, and the last export loads with from_pretrained."""
    from test_pipeline import _pipeline

    out = tmp_path / "run"
    groups = "model.groups_from.groups=[vision]"
    r = _pipeline(out, "launcher=torchrun", "launcher.nproc_per_node=2", "pipeline.engine=megatron",
                  "pipeline.max_steps=2", "pipeline.eval.enabled=false",
                  "pipeline.steps.s1_multimodal.overrides=['engine=zero2','parallel.sp_size=2']",
                  "pipeline.common=['logger=none','trainer.micro_batch_size=1','trainer.save_every=3']",
                  *[f"pipeline.steps.{s}.overrides=['engine.pp=2']" for s in ("s0_merger", "s2_long_32k",
                                                                            "s3_long_256k", "sft", "dpo")],
                  "pipeline.steps.sapo.overrides=['engine.tp=2','engine.sequence_parallel=true',"
                  "'stage.objective.num_generations=8',"
                  "'stage.objective.max_new_tokens=8','trainer.micro_batch_size=2','stage.objective.kl_beta=0.04']",
                  *[f"pipeline.steps.{s}.overrides=['engine.pp=2','{groups}']" for s in ("distill", "sft_small")],
                  timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    layout = {"s0_merger": "tp 1 x pp 2", "s2_long_32k": "tp 1 x pp 2",
              "s3_long_256k": "tp 1 x pp 2", "sft": "tp 1 x pp 2", "distill": "tp 1 x pp 2",
              "sft_small": "tp 1 x pp 2", "dpo": "tp 1 x pp 2", "sapo": "tp 2 x pp 1"}
    for name, want in layout.items():
        d = out / name
        assert (d / "DONE").is_file(), name
        log = (d / "console.log").read_text()
        assert f"engine megatron: {want}" in log and "torch.distributed.run --nproc-per-node=2 --standalone" in log
        assert [x["step"] for x in metrics_rows(d)] == [1, 2], name
    s1 = (out / "s1_multimodal" / "console.log").read_text()
    assert "sequence parallelism: 1 SP groups of 2 consecutive ranks (data-parallel size 1)" in s1
    assert "engine megatron" not in s1 and [x["step"] for x in metrics_rows(out / "s1_multimodal")] == [1, 2]
    assert f"{out / 's0_merger'}/hf" in (out / "s1_multimodal" / "config.yaml").read_text()
    assert f"{out / 's1_multimodal'}/hf" in (out / "s2_long_32k" / "config.yaml").read_text()
    sapo = metrics_rows(out / "sapo")  # one rollout batch (on the TP replica, HF's decoder) for its 2 mini-batches
    assert sapo[0]["rollout/response_length"] > 0 and all(r["loss"] is not None for r in sapo)
    assert load_hf(out / "sapo" / "hf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: engine=megatron on CUDA (NCCL, no CPU shim)")
@pytest.mark.parametrize("dtype,rel", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_a_stage_on_megatron_on_a_gpu_equals_zero2(tmp_path, dtype, rel):
    """On one CUDA device (shim off, megatron's CUDA paths: its RNG tracker, batched p2p, the distributed optimizer
    with CUDA tensors), fp32 and bf16: the s1 stage's losses and grad norms on engine=megatron equal zero2's (bf16:
    both engines' bf16, within bf16 round-off)."""
    common = ["model=tiny_qwen2_5_vl", "stage=s1_multimodal", "trainer.max_steps=3", "trainer.save_every=0",
              f"engine.dtype={dtype}"]
    run_stage(tmp_path / "zero2", [*common, "engine=zero2"])
    run_stage(tmp_path / "mg", [*common, "engine=megatron"])
    a, b = metrics_rows(tmp_path / "zero2"), metrics_rows(tmp_path / "mg")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=rel)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=10 * rel)


@pytest.mark.parametrize("model", ["tiny_qwen2_5_vl", "tiny_qwen3_vl_moe"])
def test_recomputed_decoder_layers_train_exactly_like_stored_ones(tmp_path, model, caplog):
    """model.gradient_checkpointing on engine=megatron: each decoder layer keeps only its input and reruns in
    backward (the packed row's segments go with the recomputed call; a MoE layer's router too): the same losses,
    grad norms (and router losses) as without, to float32 round-off."""
    common = [f"model={model}", "stage=s1_multimodal", "trainer.max_steps=3", "trainer.save_every=0",
              "engine=megatron", "trainer.grad_accum=2"]
    run_stage(tmp_path / "stored", common)
    with caplog.at_level("INFO", logger="training"):
        run_stage(tmp_path / "recomputed", [*common, "model.gradient_checkpointing=true"])
    assert "decoder layers recomputed in backward" in caplog.text
    a, b = metrics_rows(tmp_path / "stored"), metrics_rows(tmp_path / "recomputed")
    for k in ("loss", "grad_norm", *(["moe/aux_loss"] if "moe" in model else [])):
        assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-6), k
