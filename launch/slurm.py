"""`launcher=slurm`: one sbatch script per step, submitted as a chain with --dependency=afterok.

Each job runs `srun torchrun` (one torchrun per node, c10d rendezvous on the job's first node) on the exact
trainer arguments the local runner would use. Preemption and time limits:

- `--signal=B:USR1@grace` sends USR1 to the batch shell `grace` seconds before the time limit. The script's trap
  turns it into SIGTERM for every process of the running step (`scancel --signal=TERM $SLURM_JOB_ID` signals the
  job steps, not the batch shell): torchrun forwards TERM to its workers and waits for them, and the trainer
  checkpoints at the end of its step and exits 143. (USR1 itself would kill torchrun 2.13 at once, before its
  workers finish the checkpoint; TERM is the signal torchrun handles.) The script then sees no DONE and requeues
  its own job (`scontrol requeue`), at most `max_requeues` times. The signal goes to the batch shell (B:) rather
  than to the steps because torchrun's exit code does not carry the trainer's 143: the trap is how the script
  knows the step was stopped on purpose.
- `scontrol requeue`, preemption with PreemptMode=REQUEUE, or a node failure: Slurm itself sends SIGTERM to
  all processes of the job (the trainer checkpoints and exits) and requeues the job (`--requeue`).
- Either way the requeued job runs the same script, and the same trainer command resumes from
  checkpoints/latest (and does nothing if DONE exists). The dependants wait: afterok needs a successful end.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from launch.pipeline import REPO, StepFailed

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmConfig:
    name: str = "slurm"
    nodes: Optional[int] = None  # null: each step's own `nodes`
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    signal_grace_s: int = 120
    max_requeues: int = 20
    rdzv_port: int = 29500
    python: Optional[str] = None  # null: the interpreter running the pipeline (a shared venv)
    setup: list = field(default_factory=list)
    extra_sbatch: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    wait: bool = False


def slurm_config(node: DictConfig) -> SlurmConfig:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SlurmConfig),
                                                   OmegaConf.to_container(node, resolve=True)))
    except Exception as e:
        raise ValueError(f"launcher (slurm): {e}".replace("\n", " | ")) from None


def render(cfg: SlurmConfig, pipeline: str, step) -> str:
    """The sbatch script of one step (a pure function of the configs: golden-tested)."""
    nodes = cfg.nodes or step.cfg.nodes
    limit = step.cfg.time or cfg.time
    if nodes < 1 or cfg.nproc_per_node < 1:
        raise ValueError(f"step {step.name}: nodes={nodes} and launcher.nproc_per_node={cfg.nproc_per_node} "
                         "must be at least 1")
    sb = [f"--job-name={pipeline}-{step.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
          f"--output={step.out}/slurm-%j.out", "--open-mode=append", "--requeue",
          f"--signal=B:USR1@{cfg.signal_grace_s}", "--kill-on-invalid-dep=yes"]
    if cfg.gpus_per_node:
        sb.append(f"--gpus-per-node={cfg.gpus_per_node}")
    for key, value in (("cpus-per-task", cfg.cpus_per_task), ("mem", cfg.mem), ("partition", cfg.partition),
                       ("account", cfg.account), ("qos", cfg.qos), ("time", limit)):
        if value is not None:
            sb.append(f"--{key}={value}")
    sb += [x if x.startswith("--") else f"--{x}" for x in cfg.extra_sbatch]
    python = cfg.python or sys.executable
    env = {**({} if cfg.gpus_per_node else {"DS_ACCELERATOR": "cpu"}), **{k: str(v) for k, v in cfg.env.items()}}
    trainer = " ".join(shlex.quote(a) for a in step.args)
    q = shlex.quote
    lines = ["#!/bin/bash", *[f"#SBATCH {x}" for x in sb],
             f"# pipeline {pipeline}, step {step.name} (stage {step.cfg.stage}); written by launch.slurm:",
             "# change the pipeline/launcher config and submit again rather than editing this file.",
             "set -u", *cfg.setup,
             f"cd {q(str(REPO))}",
             *[f"export {k}={q(v)}" for k, v in env.items()],
             f"OUT={q(str(step.out))}",
             'echo "[$(date +%FT%T)] job $SLURM_JOB_ID start (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
             'if [ -f "$OUT/DONE" ]; then echo "$OUT/DONE exists: nothing to do"; exit 0; fi',
             'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             "signalled=0 terminated=0 requeued=0",
             "# USR1 (time limit near): TERM to every process of the step; the trainer checkpoints and exits",
             'trap \'signalled=1; echo "USR1: stopping the step for a requeue"; scancel --signal=TERM "$SLURM_JOB_ID"\' USR1',
             "# TERM: Slurm is ending the job (scancel, requeue, preemption) and signals the step itself",
             "trap 'terminated=1; echo \"TERM: waiting for the step to checkpoint\"' TERM",
             f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {q(python)} -m torch.distributed.run "
             f'--nnodes="$SLURM_NNODES" --nproc-per-node={cfg.nproc_per_node} --rdzv-backend=c10d '
             f'--rdzv-endpoint="$HEAD:{cfg.rdzv_port}" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 '
             f"-m training.train {trainer} &",
             "SRUN=$!",
             "# a trapped signal interrupts `wait`: wait again until srun has really ended",
             'while :; do wait "$SRUN"; rc=$?; kill -0 "$SRUN" 2>/dev/null || break; done',
             'if [ -f "$OUT/DONE" ]; then echo "[$(date +%FT%T)] step done"; exit 0; fi',
             'if [ "$signalled" = 1 ] || [ "$rc" = 143 ]; then',
             f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {cfg.max_requeues} ]; then',
             '    echo "[$(date +%FT%T)] checkpointed on a signal: requeueing job $SLURM_JOB_ID"',
             "    # ask until slurmctld accepts (a busy controller can time out), then wait for the TERM that ends this run:",
             "    # exiting before it races the requeue. (No $(...) here: Slurm's TERM goes to every process of the job.)",
             '    for try in 1 2 3 4 5; do scontrol requeue "$SLURM_JOB_ID" && requeued=1 && break; sleep 5; done',
             '    if [ "$requeued" = 1 ]; then',
             '      waited=0; while [ "$terminated" = 0 ] && [ "$waited" -lt 300 ]; do sleep 1; waited=$((waited + 1)); done',
             '      [ "$terminated" = 1 ] && exit 143',
             '      echo "[$(date +%FT%T)] Slurm accepted the requeue but did not end this run in 300 s"; exit 1',
             "    fi",
             '    echo "[$(date +%FT%T)] scontrol requeue failed 5 times: the step stops here; submit the chain again"',
             "    exit 1",
             "  fi",
             f'  echo "requeued {cfg.max_requeues} times already (launcher.max_requeues): giving up"',
             "fi",
             'if [ "$terminated" = 1 ]; then echo "[$(date +%FT%T)] ended by Slurm (requeue, cancel or preemption)"; exit 143; fi',
             'echo "[$(date +%FT%T)] step failed: exit $rc"',
             'exit "$rc"', ""]
    return "\n".join(lines)


def _sh(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


def job_state(job_id: str) -> Optional[str]:
    """PENDING / RUNNING / COMPLETED / FAILED / ...; None once Slurm has forgotten the job."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    for part in r.stdout.split():
        if part.startswith("JobState="):
            return part.split("=", 1)[1]
    return None


def submit(cfg: SlurmConfig, pipeline: str, steps: list, dry_run: bool = False) -> dict[str, str]:
    """Writes DIR/<step>/job.sbatch for the selected steps and submits them as an afterok chain.

    A step with DONE is not submitted; a step whose job from an earlier submission is still pending or
    running is not submitted again (its job id is reused as the dependency).
    """
    jobs: dict[str, str] = {}
    prev_job = None
    for step in steps:
        if not step.selected:
            prev_job = None
            continue
        if step.done:
            prev_job = None
            continue
        before = steps[step.index - 1] if step.index > 0 else None
        if before is not None and not before.done and before.name not in jobs and not dry_run:
            raise StepFailed(f"step {step.name} starts from {before.out}/hf, which is neither done nor part of "
                             f"this submission; submit from {before.name} (pipeline.from={before.name})")
        step.out.mkdir(parents=True, exist_ok=True)
        script = step.out / "job.sbatch"
        script.write_text(render(cfg, pipeline, step))
        if dry_run:
            jobs[step.name] = "dry-run"
            continue
        id_file = step.out / "slurm_job"
        old = id_file.read_text().strip() if id_file.is_file() else None
        if old and job_state(old) in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            jobs[step.name] = prev_job = old
            continue
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{prev_job}"] if prev_job else []) + [str(script)]
        job = _sh(cmd).split(";")[0]
        id_file.write_text(job + "\n")
        jobs[step.name] = prev_job = job
    return jobs


def wait(jobs: dict[str, str], steps: list, progress, poll_s: float = 2.0, settle_s: float = 90.0) -> None:
    """Shows the chain's progress until every submitted step has DONE; a failed job raises with its log.

    A job that ends without DONE counts as failed only if it stays ended for `settle_s`: a requeued job passes
    through an ended state (its batch script's exit) before Slurm puts it back in the queue, which a busy
    slurmctld was seen to take more than 20 s to do.
    """
    for step in steps:
        if step.name not in jobs:
            continue
        job = jobs[step.name]
        progress.start(step)
        ended_since = None
        while not step.done:
            state = job_state(job)
            if state in FAILED or state in (None, "COMPLETED"):
                ended_since = ended_since or time.time()
                if time.time() - ended_since >= settle_s and not step.done:
                    raise StepFailed(f"step {step.name}: slurm job {job} ended {state or '(forgotten)'} without "
                                     f"DONE; its log: {step.out}/slurm-{job}.out")
            else:
                ended_since = None
            progress.update(step)
            time.sleep(poll_s)
        progress.update(step, final=True)


def run(cfg: SlurmConfig, p, steps: list, out: Path, dry_run: bool, stopped: Optional[str]) -> int:
    """Submit (or write, with dry_run) the chain; with launcher.wait, follow it and write the report."""
    from launch.pipeline import _manifest
    from launch.progress import ChainProgress

    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(_manifest(p, steps, stopped), indent=1) + "\n")
    jobs = submit(cfg, p.name, steps, dry_run=dry_run)
    progress = ChainProgress(p.name, [s for s in steps if s.selected])
    for step in steps:
        if step.name in jobs:
            progress.message(f"{step.name}: {'wrote' if dry_run else 'job ' + jobs[step.name]} "
                             f"{step.out / 'job.sbatch'}")
        elif step.selected and step.done:
            progress.skipped(step)
    if stopped:
        progress.message(stopped)
    if dry_run or not cfg.wait:
        if not dry_run and jobs:
            progress.message(f"submitted; follow with squeue, then `python -m launch.report {out}`")
        return 0
    wait(jobs, steps, progress)
    from launch.report import write_report

    progress.message(f"report: {write_report(out, p, steps, stopped, evaluate=p.eval.enabled)}")
    return 0
