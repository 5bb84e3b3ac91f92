"""Whole stages through the real CLI, DeepSpeed on CPU, torchrun with 2 gloo ranks, kill + resume."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from conftest import REPO, clean_env, cli, load_hf, metrics_rows, run_stage
from test_heldout import _hf_loss
from training import loop
from training.models import ModelConfig, build

pytestmark = pytest.mark.slow


def _assert_complete_run(out: Path, steps: int):
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest", "hf/config.json", "hf/model.safetensors",
                 "hf/tokenizer.json", "hf/preprocessor_config.json", "DONE"):
        assert (out / name).exists(), name
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "lr", "tokens", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps:08d}" and (out / "checkpoints" / latest).is_dir()
    # DONE is written last of all
    done_t = (out / "DONE").stat().st_mtime
    assert all(p.stat().st_mtime <= done_t for p in out.rglob("*") if p.is_file())
    return rows


def test_cli_stage_trains_writes_outputs_and_export_loads_unchanged(tmp_path):
    out = tmp_path / "run"
    r = cli(["stage=s1_multimodal", "model=tiny_qwen3_vl", "data=shapes", "engine=zero2", "trainer.max_steps=20",
             f"output_dir={out}", "logger=none"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _assert_complete_run(out, 20)
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5  # it learns
    assert all(r["grad_norm"] > 0 for r in rows)  # one rank runs engine=zero2 as stage 0: GuardedAdamW reports it
    assert "step 20/20" in (out / "train.log").read_text()  # the console progress line
    summary = json.loads((out / "DONE").read_text())
    assert summary["steps"] == 20 and abs(summary["final_loss"] - rows[-1]["loss"]) < 1e-12
    # the export loads with plain transformers and is the trained model, not the initial one
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(out / "hf")
    init = build(ModelConfig()).model.state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(out / "hf").chat_template


@pytest.mark.parametrize("engine", ["zero1", "zero3"])
def test_other_zero_stages_train_and_export_full_weights(engine, tmp_path):
    run_stage(tmp_path, [f"engine={engine}", "trainer.max_steps=3", "model=tiny_qwen2_5_vl"])
    _assert_complete_run(tmp_path, 3)
    w = load_hf(tmp_path / "hf")
    init = dict(build(ModelConfig(family="qwen2_5_vl")).model.named_parameters())
    assert all(w[k].shape == init[k].shape for k in init)  # ZeRO-3 shards gathered, not empty [0] tensors
    assert any(not torch.equal(w[k], init[k]) for k in init)


def test_bf16_on_one_rank_trains_with_deepspeeds_bf16_optimizer(tmp_path, monkeypatch):
    """The paper recipes' engine.dtype=bf16 on one rank, where engine=zero2 runs as stage 0: DeepSpeed's bf16
    optimizer (fp32 master weights) steps, reports the gradient norm, and the run exports."""
    engines = []
    real = loop.engines.build

    def initialize(*args, **kwargs):
        out = real(*args, **kwargs)
        engines.append(out)
        return out

    monkeypatch.setattr(loop.engines, "build", initialize)
    run_stage(tmp_path, ["engine.dtype=bf16", "trainer.max_steps=2", "trainer.micro_batch_size=1"])
    _assert_complete_run(tmp_path, 2)
    assert engines[0].ds.zero_optimization_stage() == 0 and engines[0].ds.bfloat16_enabled()
    rows = metrics_rows(tmp_path)
    assert all(r["grad_norm"] > 0 and r["skipped"] is None for r in rows)
    assert rows[1]["loss"] < rows[0]["loss"] + 1.0


def test_max_steps_zero_exports_the_initial_model_unchanged(tmp_path):
    run_stage(tmp_path, ["trainer.max_steps=0", "model=tiny_qwen2_vl"])
    assert (tmp_path / "DONE").is_file() and (tmp_path / "config.yaml").is_file()
    w = load_hf(tmp_path / "hf")
    init = dict(build(ModelConfig(family="qwen2_vl")).model.named_parameters())
    assert w.keys() == init.keys() and all(torch.equal(w[k], init[k]) for k in init)


def test_a_finished_stage_is_not_run_again(tmp_path):
    run_stage(tmp_path, ["trainer.max_steps=1"])
    before = (tmp_path / "metrics.jsonl").read_text()
    summary = run_stage(tmp_path, ["trainer.max_steps=1"])
    assert summary["steps"] == 1 and (tmp_path / "metrics.jsonl").read_text() == before


TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


# 1 process: SAPO resume (test_preference_dist); megatron: one replica of TP 2 (engine.tp=2)
@pytest.mark.parametrize("nproc,engine,sp", [(2, "zero3", 1), (2, "zero2", 2), (2, "megatron", 1)])
def test_killed_run_resumes_bit_identically(tmp_path, nproc, engine, sp):
    """SIGKILL at an arbitrary step, re-run: losses from the restored step on equal an uninterrupted run exactly.

    The data chain (mixture RNG, shard offsets, packer buffer) resumes from its saved state, so the batches
    after the restore are the ones the uninterrupted run saw; fixed seed, deterministic CPU kernels. At sp=2 both
    processes form one SP group (one data stream, each writing its trainer state); ZeRO-2 partitions over both.
    """
    out, ref = tmp_path / "run", tmp_path / "ref"
    steps = 12
    # with held-out evaluations (stage.eval): one micro-batch per source, so at DP=2 rank 1 runs the uncounted one
    common = [f"trainer.max_steps={steps}", "logger=none", "model=tiny_qwen2_vl", f"engine={engine}",
              "data.shapes.tasks=[caption,vqa,text]", f"parallel.sp_size={sp}", "stage.eval.every=5",
              "stage.eval.samples=5", "stage.eval.sources=[vqa,caption]", *(["engine.tp=2"] if engine == "megatron" else [])]
    launcher = TORCHRUN2 if nproc == 2 else [sys.executable, "-m"]
    args = launcher + ["training.train", conftest.SHORT_ROWS, "trainer.save_every=3", "trainer.keep_checkpoints=100",
                       f"output_dir={out}", *common]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 400
    kill_after = random.Random().randint(3, 9)  # an arbitrary step past the first checkpoint
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and (out / "metrics.jsonl").exists() and \
                len((out / "metrics.jsonl").read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    # every rank and the launcher, no chance to save (torchrun starts its workers in sessions of their own)
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", f"output_dir={out}"])
    proc.wait()
    while subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True).returncode == 0:
        time.sleep(0.1)
    assert not (out / "DONE").exists(), "run finished before it could be killed"
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved >= 3

    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in r.stderr + (out / "train.log").read_text()
    rows = _assert_complete_run(out, steps)  # steps the killed run logged after its checkpoint were dropped
    if nproc == 2:
        assert {p.name for p in (out / "checkpoints" / latest.read_text().strip()).glob("trainer_rank*.json")} == {
            "trainer_rank0.json", "trainer_rank1.json"}
    r = subprocess.run(launcher + ["training.train", conftest.SHORT_ROWS, "trainer.save_every=0",
                                   f"output_dir={ref}", *common],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    ref_rows = metrics_rows(ref)
    assert [x["loss"] for x in rows] == [x["loss"] for x in ref_rows]  # bit-identical, not approx
    held_out = [{k: v for k, v in x.items() if k.startswith(("eval/loss", "epoch/"))} for x in rows]
    assert held_out == [{k: v for k, v in x.items() if k.startswith(("eval/loss", "epoch/"))} for x in ref_rows]
    assert [x["step"] for x in rows if "eval/loss" in x] == [5, 10, 12]
    # the last evaluation saw the exported weights: HF's own loss on the same samples one at a time, weighted as
    # the stage (s1_multimodal) weighs its samples
    assert rows[-1]["eval/loss/vqa"] == pytest.approx(_hf_loss(out / "hf", "vqa", 5, "sqrt"), rel=1e-5)


def test_resume_with_another_world_size_is_refused(tmp_path):
    run_stage(tmp_path, ["trainer.max_steps=1", "trainer.save_every=1"])
    (tmp_path / "DONE").unlink()
    r = cli(["trainer.max_steps=2", f"output_dir={tmp_path}", "logger=none"], launcher=TORCHRUN2)
    assert r.returncode != 0
    assert "was written by 1 data-parallel ranks but this run has 2" in r.stderr + r.stdout


def test_wandb_logs_offline_under_the_output_dir(tmp_path):
    run_stage(tmp_path, ["logger=wandb", "trainer.max_steps=2"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "training.train", "trainer.max_steps=100000", "trainer.save_every=0",
            f"output_dir={out}", "logger=none", "model=tiny_qwen2_vl", conftest.SHORT_ROWS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert not (out / "DONE").exists()
    steps = [r["step"] for r in metrics_rows(out)]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps[-1]:08d}"
    r = cli([a for a in args[3:] if not a.startswith("trainer.max_steps")] + [f"trainer.max_steps={steps[-1] + 2}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in metrics_rows(out)] == list(range(1, steps[-1] + 3))


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_resume_reads_checkpoints_without_pickle(engine, tmp_path, monkeypatch):
    run_stage(tmp_path, [f"engine={engine}", "trainer.max_steps=2", "trainer.save_every=1"])
    (tmp_path / "DONE").unlink()  # pretend the run died after its last checkpoint
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    summary = run_stage(tmp_path, [f"engine={engine}", "trainer.max_steps=3", "trainer.save_every=1"])
    assert summary["steps"] == 3 and [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]
    assert calls and all(w is True for w in calls), calls


def test_a_crash_while_writing_leaves_the_previous_checkpoint_in_charge(tmp_path):
    run_stage(tmp_path, ["trainer.max_steps=2", "trainer.save_every=1"])
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000001", "step_00000002"]
    # what a crash in the middle of saving step 3 leaves behind: a partial .tmp directory
    (tmp_path / "DONE").unlink()
    partial = ckpts / "step_00000003.tmp"
    partial.mkdir()
    (partial / "trainer_rank0.json").write_text("{trunc")
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    summary = run_stage(tmp_path, ["trainer.max_steps=4", "trainer.save_every=1"])
    assert summary["steps"] == 4 and [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not list(ckpts.glob("*.tmp")) and (ckpts / "step_00000003" / "trainer_rank0.json").is_file()
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000003", "step_00000004"]  # keep 2


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_next_stage_can_start_from_a_checkpoint_dir(tmp_path, engine):
    """model.path at a stage's output dir (its checkpoints/latest): the weights carry over, the optimizer not."""
    prev, nxt = tmp_path / "prev", tmp_path / "next"
    run_stage(prev, [f"engine={engine}", "trainer.max_steps=2", "model=tiny_qwen2_5_vl"])
    (prev / "DONE").unlink()  # as if it were still running: only the checkpoint is used, not hf/
    import shutil

    shutil.rmtree(prev / "hf")
    run_stage(nxt, ["stage=sft", "trainer.max_steps=0", "model=tiny_qwen2_5_vl", f"model.path={prev}"])
    run_stage(prev / "again", ["trainer.max_steps=0", "model=tiny_qwen2_5_vl", f"model.path={prev}/checkpoints"])
    started, again = load_hf(nxt / "hf"), load_hf(prev / "again" / "hf")
    init = dict(build(ModelConfig(family="qwen2_5_vl")).model.named_parameters())
    assert any(not torch.equal(started[k], init[k]) for k in init)  # trained weights, not the random init
    assert all(torch.equal(started[k], again[k]) for k in init)
