"""launch.pipeline: the plan of a chain, skip of DONE steps, resume of an interrupted step, a failing step
stopping the chain, pipeline.only / pipeline.from, torchrun with 2 processes, and the report with its plots.
Every chain here is the real thing (subprocesses of `python -m launch.pipeline`) on a few tiny steps."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, clean_env, metrics_rows
from launch.pipeline import LauncherConfig, check_steps, command, compose, pipeline_config, plan, step_world

FEW = "pipeline.common=['logger=none','trainer.micro_batch_size=2','trainer.save_every=3']"


def _plan(tmp_path, *overrides, pipeline="tiny"):
    cfg = compose("launch", [f"pipeline={pipeline}", f"output_dir={tmp_path}", *overrides])
    return plan(pipeline_config(cfg.pipeline), Path(cfg.output_dir))


def _pipeline(out: Path, *overrides, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.pipeline", f"output_dir={out}", FEW, *overrides],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def test_plan_chains_exports_and_selects_steps(tmp_path):
    steps = _plan(tmp_path)
    assert [s.name for s in steps] == ["s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "distill",
                                       "sft_small", "dpo", "sapo"]
    assert steps[0].init is None and not any(a.startswith("model.path=") for a in steps[0].args)
    by = {s.name: s for s in steps}
    main = [by[n] for n in ("s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft")]
    for prev, step in zip(main, main[1:]):  # each step starts from the previous step's export
        assert step.init == str(prev.out / "hf") and f"model.path={prev.out}/hf" in step.args
    # the distillation demo: a smaller student from its own random init, the sft export as teacher; sft_small the
    # same student by plain SFT; dpo goes on from sft (the main line), sapo from dpo
    for name in ("distill", "sft_small"):
        assert by[name].init is None and not any(a.startswith("model.path=") for a in by[name].args)
        assert "model=tiny_qwen3_vl_small" in by[name].args
    assert f"stage.objective.teacher={by['sft'].out}/hf" in by["distill"].args
    assert not any("teacher" in a for a in by["sft_small"].args)
    assert by["dpo"].init == str(by["sft"].out / "hf") and by["sapo"].init == str(by["dpo"].out / "hf")
    with pytest.raises(ValueError, match="pipeline.steps.sft.teacher='dpo' is not an earlier step"):
        _plan(tmp_path, "+pipeline.steps.sft.teacher=dpo")
    with pytest.raises(ValueError, match="pipeline.steps.dpo.init='nope'"):
        _plan(tmp_path, "pipeline.steps.dpo.init=nope")
    assert "data.shapes.tasks=[vqa,caption]" in steps[4].args and "stage=sft" in steps[4].args
    assert "stage.mixture={vqa: 3, caption: 1}" in steps[4].args
    assert all(s.selected for s in steps)
    picked = _plan(tmp_path, "pipeline.from=s3_long_256k", "pipeline.max_steps=2")
    assert [s.name for s in picked if s.selected] == ["s3_long_256k", "sft", "distill", "sft_small", "dpo", "sapo"]
    assert all(s.max_steps == 2 for s in picked)
    only = _plan(tmp_path, "pipeline.only=[s1_multimodal,sft]")
    assert [s.name for s in only if s.selected] == ["s1_multimodal", "sft"]
    with pytest.raises(ValueError, match="unknown step.*s9"):
        _plan(tmp_path, "pipeline.only=[s9]")
    with pytest.raises(ValueError, match="pipeline.data"):
        _plan(tmp_path, "pipeline.steps.sft.data=nope")


def test_paper_recipes_have_the_papers_stage_order(tmp_path):
    order = {"qwen2vl": ["vit_align", "s1_multimodal", "sft"],
             "qwen2_5vl": ["vit_align", "s1_multimodal", "s2_long_32k", "sft", "dpo"],
             "qwen3vl": ["s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "sft", "distill",
                         "distill", "dpo", "sapo"]}  # sft twice: the 32K pass, then the 256K one; distill off, on
    seq = {"s2_long_32k": "32768", "s3_long_256k": "262144", "s1_multimodal": "8192"}
    for name, stages in order.items():
        steps = _plan(tmp_path, "pipeline.init_path=/ckpt/x", pipeline=name)
        assert [s.cfg.stage for s in steps] == stages, name
        assert steps[0].init == "/ckpt/x"
        for s in steps:
            if s.cfg.stage in seq:
                assert f"stage.seq_len={seq[s.cfg.stage]}" in s.args, (name, s.name)
    with pytest.raises(Exception, match="init_path"):  # real recipes need a starting checkpoint
        _plan(tmp_path, pipeline="qwen3vl")
    steps = _plan(tmp_path, "pipeline.init_path=/ckpt/x", "pipeline.teacher=/ckpt/teacher", pipeline="qwen3vl")
    distill = [s for s in steps if s.cfg.stage == "distill"]
    assert all("stage.objective.teacher=/ckpt/teacher" in s.args for s in distill)
    assert "stage.objective.lmbda=1.0" in distill[1].args and "stage.objective.lmbda=1.0" not in distill[0].args


def test_every_step_config_composes_and_torchrun_flags(tmp_path):
    steps = _plan(tmp_path)
    check_steps(steps)  # every step's trainer config composes and validates (raises otherwise)
    bad = _plan(tmp_path, "pipeline.steps.sft.overrides=['trainer.max_stepz=3']")
    with pytest.raises(ValueError, match="step sft"):
        check_steps(bad)
    # training.train's checks run for every step before the first one starts, with the step's process count
    zero = _plan(tmp_path, "pipeline.steps.sft.overrides=['trainer.grad_accum=0']")
    with pytest.raises(ValueError, match="step sft: trainer.grad_accum=0 must be at least 1"):
        check_steps(zero)
    raw = _plan(tmp_path, "pipeline.common=['trainer.micro_batch_size=2','+engine.raw.train_batch_size=2']")
    check_steps(raw)  # one process: 2 x 1 x 1 = 2
    with pytest.raises(ValueError, match=r"step s0_merger: engine.raw.train_batch_size=2 .* world size \(2\)"):
        check_steps(raw, world=lambda step: 2)
    launch = compose("launch", ["launcher=torchrun", "launcher.nproc_per_node=2"]).launcher
    assert step_world(launch, steps[0]) == 2
    one = command(LauncherConfig(name="torchrun", nproc_per_node=2), steps[0])
    assert one[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    multi = command(LauncherConfig(name="torchrun", nproc_per_node=8, nnodes=4, node_rank=3,
                                   rdzv_endpoint="node0:29400", rdzv_id="tiny"), steps[1])
    for flag in ("--nnodes=4", "--node-rank=3", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
                 "--rdzv-id=tiny-s1_multimodal"):
        assert flag in multi
    assert multi[multi.index("training.train") + 1:] == steps[1].args
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        command(LauncherConfig(name="torchrun", nnodes=2), steps[0])


@pytest.mark.slow
def test_chain_runs_skips_done_steps_and_reruns_from_a_step(tmp_path):
    """s0 -> s1, and the distill step with s1's export as its teacher (a smaller student from its own init), then a
    re-run that skips all three, then pipeline.from re-running one."""
    out = tmp_path / "run"
    distill = ["pipeline.steps.distill.teacher=s1_multimodal", "pipeline.eval.teacher=s1_multimodal",
               "pipeline.steps.distill.exports={model.groups_from.path: s1_multimodal}"]
    only = "pipeline.only=[s0_merger,s1_multimodal,distill]"
    r = _pipeline(out, only, "pipeline.max_steps=3", "pipeline.eval.samples=6", *distill)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1, d2 = out / "s0_merger", out / "s1_multimodal", out / "distill"
    for d in (s0, s1, d2):
        assert (d / "DONE").is_file() and [x["step"] for x in metrics_rows(d)] == [1, 2, 3]
    conf = (d2 / "config.yaml").read_text()
    assert f"teacher: {s1}/hf" in conf and "name: tiny_qwen3_vl_small" in conf and "  path: null" in conf
    assert f"path: {s1}/hf" in conf  # model.groups_from: the student's ViT is the teacher's
    assert all("distill/divergence" in x for x in metrics_rows(d2))
    assert f"model.path={s0}/hf" in (s1 / "config.yaml").read_text() or \
        str(s0 / "hf") in (s1 / "config.yaml").read_text()
    assert "[tiny 2/3 s1_multimodal] step 3/3" in r.stderr and "held-out: caption loss" in r.stderr
    # the report: a table, a section per step, PNG plots that exist
    report = (out / "report.md").read_text()
    assert "| s0_merger | s0_merger | merger | lm | 3 |" in report and "## s1_multimodal" in report
    for png in ("s0_merger.png", "s1_multimodal.png", "held_out.png"):
        assert f"plots/{png}" in report
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    cache = json.loads((out / "eval_cache.json").read_text())
    # initial model, s0's export (= s1's start), s1's export: each evaluated once; the student's init and export
    # with the KL to the teacher
    assert len(cache) == 5 and sum("teacher_kl" in m for m in cache.values()) == 2
    assert "held-out KL to the teacher (start → end)" in report and "## distill: Strong-to-weak distillation" in report
    assert all({"caption_loss", "vqa_accuracy", "rl_reward", "rl_reward_sampled", "pref_accuracy"} <= set(m) and len(m["pref_margins"]) == 6
               for m in cache.values())
    assert "held-out RL reward, greedy (sampled)" in report and "| rl_reward_sampled |" in report
    # a second run skips both steps and trains nothing
    before = {d: (d / "metrics.jsonl").read_text() for d in (s0, s1, d2)}
    r = _pipeline(out, only, "pipeline.max_steps=3", "pipeline.eval.samples=6", *distill)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("DONE exists: skipped") == 3
    assert all((d / "metrics.jsonl").read_text() == t for d, t in before.items())
    # pipeline.from re-runs s1 (deleted) from s0's export, leaving s0 alone
    import shutil

    shutil.rmtree(s1)
    r = _pipeline(out, "pipeline.from=s1_multimodal", "pipeline.only=[s1_multimodal]", "pipeline.max_steps=2",
                  "pipeline.eval.enabled=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (s0 / "metrics.jsonl").read_text() == before[s0]
    assert [x["step"] for x in metrics_rows(s1)] == [1, 2] and not (out / "s2_long_32k").exists()


@pytest.mark.slow
def test_interrupted_step_resumes_where_its_checkpoint_left_off(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "launch.pipeline", f"output_dir={out}", FEW, "pipeline.only=[s0_merger]",
            "pipeline.max_steps=20", "pipeline.eval.enabled=false"]
    proc = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "s0_merger" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # as Ctrl-C or a scheduler would: the runner forwards it to the step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    done_before = len(metrics_rows(out / "s0_merger"))
    assert 5 <= done_before < 20 and not (out / "s0_merger" / "DONE").exists()
    assert f"step s0_merger interrupted (exit 143): checkpoint at step {done_before} written; re-run to resume: " \
           f"`python -m launch.pipeline output_dir={out} " in err, err[-3000:]
    r = subprocess.run(args, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in metrics_rows(out / "s0_merger")] == list(range(1, 21))  # each step exactly once
    log = (out / "s0_merger" / "console.log").read_text()
    assert f"resumed from {out}/s0_merger/checkpoints/step_{done_before:08d} at step {done_before}" in log


@pytest.mark.slow
def test_a_signal_during_a_trainers_start_up_says_no_checkpoint_was_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.pipeline", f"output_dir={out}", FEW,
                             "pipeline.only=[s0_merger]", "pipeline.max_steps=20", "pipeline.eval.enabled=false"],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "s0_merger" / "console.log"
    t0 = time.time()
    while not log.is_file():  # the runner writes the step's command there, then starts it
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "step s0_merger interrupted" in err and "no checkpoint was written; the step will start over on re-run" \
        in err and "checkpoint at step" not in err, err[-3000:]
    assert not (out / "s0_merger" / "checkpoints" / "latest").exists() and not (out / "s0_merger" / "DONE").exists()


@pytest.mark.slow
def test_a_signal_during_a_steps_evaluation_stops_before_the_next_step(tmp_path, monkeypatch, capsys):
    import os

    from launch import pipeline, report

    evaluated = []

    def step_eval(step, settings):  # Ctrl-C while the runner evaluates the finished step
        evaluated.append(step.name)
        os.kill(os.getpid(), signal.SIGINT)
        return None

    monkeypatch.setattr(report, "step_eval", step_eval)
    out = tmp_path / "run"
    cfg = compose("launch", [f"output_dir={out}", FEW, "pipeline.only=[s0_merger,s1_multimodal]",
                             "pipeline.max_steps=1"])
    assert pipeline.run(cfg, resume="python -m launch.pipeline again") == 143
    err = capsys.readouterr().err
    assert evaluated == ["s0_merger"] and (out / "s0_merger" / "DONE").is_file()
    assert not (out / "s1_multimodal").exists() and not (out / "report.md").exists()  # the next step never started
    assert "SIGINT: stopped before step s1_multimodal; re-run to go on from there: " \
           "`python -m launch.pipeline again`" in err, err[-3000:]


@pytest.mark.slow
def test_a_failing_step_stops_the_chain_and_names_its_log(tmp_path):
    out = tmp_path / "run"
    # a model directory that does not exist passes the config checks and fails when the step builds its model
    r = _pipeline(out, "pipeline.only=[s0_merger,s1_multimodal]", "pipeline.max_steps=2",
                  f"pipeline.steps.s0_merger.overrides=['model.path={tmp_path}/missing/hf']")
    assert r.returncode == 1, r.stderr[-3000:]
    log = out / "s0_merger" / "console.log"
    assert f"step s0_merger (s0_merger) failed with exit code 2; its log: {log}" in r.stderr
    assert f"model.path='{tmp_path}/missing/hf' is not a Hugging Face model directory" in log.read_text()
    assert not (out / "s1_multimodal").exists()  # the chain stopped
    # a config error in a later step fails before anything runs, naming the step
    r = _pipeline(tmp_path / "run2", "pipeline.steps.sft.overrides=['stage.objective.name=nope']")
    assert r.returncode == 2 and "step sft" in r.stderr and "nope" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run2" / "s0_merger").exists()
    # (a trainer key's check, per step, before anything runs: test_every_step_config_composes_and_torchrun_flags)
