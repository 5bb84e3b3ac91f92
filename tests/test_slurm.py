"""launcher=slurm: the sbatch scripts (golden content), and a real single-node Slurm cluster running a two-step
tiny chain through a preemption by `scontrol requeue` and a time-limit warning (USR1 to the batch shell).

The cluster is Debian's slurm-wlm (apt-get install slurmctld slurmd slurm-client; .ci/run does it), started here
as root with auth/none on loopback ports. Where it cannot be installed or started, the test says why and skips.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, clean_env, metrics_rows
from launch.pipeline import compose, pipeline_config, plan
from launch.slurm import SlurmConfig, render


def _steps(tmp_path, pipeline="qwen3vl", extra=()):
    cfg = compose("launch", [f"pipeline={pipeline}", "pipeline.init_path=/ckpt/init", f"output_dir={tmp_path}",
                             *extra])
    return plan(pipeline_config(cfg.pipeline), Path(cfg.output_dir))


def test_sbatch_script_golden_content(tmp_path):
    steps = _steps(tmp_path)
    cfg = SlurmConfig(nproc_per_node=8, gpus_per_node=8, cpus_per_task=96, mem="0", partition="gpu", account="vlm",
                      qos="high", time="2-00:00:00", signal_grace_s=300, rdzv_port=29611, python="/venv/bin/python",
                      setup=["module load cuda/12.4", "source /venv/bin/activate"], extra_sbatch=["--exclusive"],
                      env={"NCCL_DEBUG": "WARN"})
    s0, s1 = steps[0], steps[1]
    text = render(cfg, "qwen3vl", s1)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --job-name=qwen3vl-s1_multimodal", "#SBATCH --nodes=64", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=96", "#SBATCH --mem=0",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vlm", "#SBATCH --qos=high",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --exclusive", "#SBATCH --open-mode=append", "#SBATCH --kill-on-invalid-dep=yes",
                 f"#SBATCH --output={s1.out}/slurm-%j.out", "module load cuda/12.4", "source /venv/bin/activate",
                 "export NCCL_DEBUG=WARN",
                 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 'scontrol requeue "$SLURM_JOB_ID"', 'scancel --signal=TERM "$SLURM_JOB_ID"'):
        assert want in lines or any(want in l for l in lines), want
    # #SBATCH lines must all come before the first command, or sbatch ignores them
    first_cmd = next(i for i, l in enumerate(lines[1:], 1) if l and not l.startswith("#"))
    assert not any(l.startswith("#SBATCH") for l in lines[first_cmd:])
    srun = next(l for l in lines if l.startswith("srun "))
    assert srun.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 /venv/bin/python -m torch.distributed.run ")
    for flag in ('--nnodes="$SLURM_NNODES"', "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$HEAD:29611"', '--rdzv-id="$SLURM_JOB_ID"'):
        assert flag in srun, flag
    # the trainer gets exactly the arguments the local runner would use: the previous step's export as model
    assert srun.endswith("&") and "-m training.train " + " ".join(s1.args) in srun
    assert f"model.path={s0.out}/hf" in srun and "DS_ACCELERATOR" not in text  # GPU nodes
    assert "--gpus-per-node" not in render(SlurmConfig(), "qwen3vl", s0)
    assert "export DS_ACCELERATOR=cpu" in render(SlurmConfig(), "qwen3vl", s0)
    assert "#SBATCH --nodes=3" in render(SlurmConfig(nodes=3), "qwen3vl", s0)  # launcher.nodes wins
    r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_writes_every_script_and_submits_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.pipeline", "pipeline=qwen2_5vl", "launcher=slurm",
                        "pipeline.init_path=/ckpt/q25", f"output_dir={tmp_path}", "launcher.partition=debug",
                        "--dry-run"], cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = ["vit_align", "s1_multimodal", "s2_long_32k", "sft", "dpo"]
    for n in names:
        script = (tmp_path / n / "job.sbatch").read_text()
        assert "#SBATCH --partition=debug" in script and f"stage={n if n != 's2_long_32k' else n}" in script
        assert not (tmp_path / n / "slurm_job").exists()  # nothing submitted
    assert "#SBATCH --nodes=32" in (tmp_path / "s2_long_32k" / "job.sbatch").read_text()
    assert "stage.seq_len=32768" in (tmp_path / "s2_long_32k" / "job.sbatch").read_text()


# ------------------------------------------------------------------ a real cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd on this machine (root, auth/none, loopback ports); yields the environment to use it."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    "slurm-client (Debian's slurm-wlm 22.05; .ci/run installs it)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmctld/slurmd as root (auth/none); this test is not root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=qvt{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(clean_env(), SLURM_CONF=str(conf))
    procs = [subprocess.Popen([shutil.which("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1.0)
    procs.append(subprocess.Popen([shutil.which("slurmd"), "-D", "-f", str(conf)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    state = ""
    for _ in range(60):
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        state = r.stdout.strip()
        if state == "idle":
            break
        time.sleep(0.5)
    if state != "idle":
        logs = "\n".join(f.read_text()[-1500:] for f in (d / "log").glob("*.log"))
        for p in procs:
            p.terminate()
        pytest.skip(f"the local Slurm cluster did not start (node state {state!r}); logs:\n{logs}")
    yield env
    for p in procs:  # only the daemons this fixture started
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _scontrol(env, *args) -> str:
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True).stdout


def _job(env, job: str) -> dict:
    out = _scontrol(env, "show", "job", "-o", job)
    return dict(p.split("=", 1) for p in out.split() if "=" in p)


def _wait_rows(out: Path, n: int, proc, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "metrics.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.3)
    raise AssertionError(f"{out}: fewer than {n} metrics rows after {timeout} s")


@pytest.mark.slow
def test_chain_survives_requeue_and_time_limit_signal_on_a_real_cluster(slurm_cluster, tmp_path):
    env = slurm_cluster
    out = tmp_path / "chain"
    s0, s1 = out / "s0_merger", out / "s1_multimodal"
    steps0, steps1 = 12, 8  # checkpoints every 4: the requeue after 6 rows resumes at 4
    args = [sys.executable, "-m", "launch.pipeline", "launcher=slurm", "launcher.wait=true",
            f"launcher.python={sys.executable}", f"launcher.rdzv_port={_free_port()}", f"output_dir={out}", "pipeline.only=[s0_merger,s1_multimodal]",
            f"pipeline.steps.s0_merger.steps={steps0}", f"pipeline.steps.s1_multimodal.steps={steps1}",
            "pipeline.eval.enabled=false", "pipeline.common=['logger=none','trainer.micro_batch_size=2','trainer.save_every=4','data.num_workers=2']"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # 1. preempt the first step the way a cluster does: scontrol requeue (Slurm sends SIGTERM, then requeues)
        _wait_rows(s0, 6, proc, 300)
        job0 = (s0 / "slurm_job").read_text().strip()
        job1 = (s1 / "slurm_job").read_text().strip()
        assert f"afterok:{job0}" in _job(env, job1).get("Dependency", ""), _job(env, job1)
        subprocess.run(["scontrol", "requeue", job0], env=env, check=True)
        # 2. the second step gets the time-limit warning: USR1 to the batch shell, as --signal=B:USR1@grace sends it
        signalled = False
        t0 = time.time()
        pending_since: dict = {}
        while proc.poll() is None and time.time() - t0 < 400:
            for job in (job0, job1):  # a requeued job waits ~2 minutes on its BeginTime: start it sooner, but
                info = _job(env, job)  # not in the second of the requeue (slurmd still revokes the old run's
                if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":  # credential: it fails)
                    if time.time() - pending_since.setdefault(job, time.time()) >= 3:
                        _scontrol(env, "update", f"jobid={job}", "StartTime=now")
                        pending_since.pop(job)
                else:
                    pending_since.pop(job, None)
            rows1 = metrics_rows(s1) if (s1 / "metrics.jsonl").is_file() else []
            if not signalled and len(rows1) >= 4 and _job(env, job1).get("JobState") == "RUNNING":
                subprocess.run(["scancel", "--batch", "--signal=USR1", job1], env=env, check=True)
                signalled = True
            time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", *(p.read_text().strip() for p in out.glob("*/slurm_job"))], env=env)
    log0 = "".join(p.read_text() for p in s0.glob("slurm-*.out"))
    log1 = "".join(p.read_text() for p in s1.glob("slurm-*.out"))
    assert proc.returncode == 0, f"{stderr[-3000:]}\n--- s0 job log:\n{log0[-3000:]}\n--- s1 job log:\n{log1[-3000:]}"
    assert signalled
    for d, n, log in ((s0, steps0, log0), (s1, steps1, log1)):
        assert (d / "DONE").is_file() and (d / "hf" / "config.json").is_file()
        rows = metrics_rows(d)
        assert [r["step"] for r in rows] == list(range(1, n + 1)), log[-2000:]  # every step exactly once
        assert "(restart 0)" in log and "(restart 1)" in log, log[-2000:]  # it ran, was requeued, ran again
        resumed = [l for l in (d / "train.log").read_text().splitlines() if "resumed from" in l]
        assert len(resumed) == 1, (d / "train.log").read_text()[-2000:]
    assert "requeueing job" in log1  # the USR1 path: the script requeued its own job after the checkpoint
    assert f"model.path={s0}/hf" in (s1 / "job.sbatch").read_text()
    # the resumed first step continues from its checkpoint: its losses equal an uninterrupted run's
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "launch.pipeline", f"output_dir={ref}", "pipeline.only=[s0_merger]",
                        f"pipeline.steps.s0_merger.steps={steps0}", "pipeline.eval.enabled=false",
                        "pipeline.common=['logger=none','trainer.micro_batch_size=2','trainer.save_every=4','data.num_workers=2']"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = [x["loss"] for x in metrics_rows(s0)], [x["loss"] for x in metrics_rows(ref / "s0_merger")]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4 * max(abs(b) for b in want), (got, want)
