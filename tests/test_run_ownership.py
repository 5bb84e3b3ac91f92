"""One run per output directory, trainers that die with their launcher, stop signals with loader workers running,
metrics.jsonl bookkeeping across kills, data-skip counts where users look, and a checkpoint write that fails."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from conftest import REPO, clean_env, metrics_rows, run_stage
from data.shards import write_tar
from training.metrics import LoggerConfig, Metrics, read_rows
from training.rundir import RunLock

TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


def _wait_rows(out: Path, n: int, proc, timeout=400) -> None:
    f, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (f.exists() and len(read_rows(f)) >= n):
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.05)


def _trainers(out: Path) -> list[str]:
    r = subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True, text=True)
    return r.stdout.split()


# ---------------------------------------------------------------- one run per output directory


def test_a_second_run_on_a_live_directory_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from training.rundir import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on host "):
            run_stage(tmp_path, ["trainer.max_steps=1"])
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock: no stale-lock clean-up needed
        pass


@pytest.mark.slow
def test_killing_torchrun_leaves_no_trainer_behind_and_the_restart_resumes(tmp_path):
    """SIGKILL of torchrun's process group: the workers (each in its own session) notice their launcher is gone,
    checkpoint at the end of the step and exit; the restart resumes from that checkpoint."""
    out = tmp_path / "run"
    args = TORCHRUN2 + ["training.train", conftest.SHORT_ROWS, "trainer.save_every=0", "logger=none",
                        "model=tiny_qwen2_vl", f"output_dir={out}"]
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(args + ["trainer.max_steps=100000"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env(), start_new_session=True)
        _wait_rows(out, 2, proc)
        assert len(_trainers(out)) == 3  # torchrun and its two workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 120
        while _trainers(out) and time.time() < deadline:
            time.sleep(0.2)
    assert not _trainers(out), (tmp_path / "first.log").read_text()[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved == metrics_rows(out)[-1]["step"] >= 2
    r = subprocess.run(args + [f"trainer.max_steps={saved + 1}"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in (out / "train.log").read_text()
    assert [x["step"] for x in metrics_rows(out)] == list(range(1, saved + 2))


# ---------------------------------------------------------------- stop signals with loader workers


def _shapes_sources(tasks=("caption", "vqa")) -> str:
    from data import shapes

    paths = shapes.ensure_cache(shapes.ShapesConfig(tasks=list(tasks)), split="train")
    return "[" + ",".join(f"{{name: {t}, urls: [{','.join(urls)}]}}" for t, urls in paths.items()) + "]"


@pytest.mark.slow
def test_term_and_ctrl_c_to_the_process_group_checkpoint_with_two_loader_workers(tmp_path):
    """What scancel --signal=TERM, Slurm preemption and a terminal's Ctrl-C do: signal the whole group, loader
    workers included. Each time the trainer checkpoints the step it was on and exits 143; the re-runs resume."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "training.train", conftest.SHORT_ROWS, "trainer.save_every=0", "logger=none",
            "model=tiny_qwen2_vl", "data=shards", f"data.sources={_shapes_sources()}", "data.num_workers=2",
            f"output_dir={out}"]
    done = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        with (tmp_path / f"{sig.name}.log").open("w") as log:
            proc = subprocess.Popen(base + ["trainer.max_steps=100000"], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
            _wait_rows(out, done + 2, proc)
            os.killpg(proc.pid, sig)
            rc = proc.wait(timeout=300)
        assert rc == 143, (tmp_path / f"{sig.name}.log").read_text()[-3000:]
        done = metrics_rows(out)[-1]["step"]
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{done:08d}"
        assert not _trainers(out)  # the workers were shut down with the trainer
    r = subprocess.run(base + [f"trainer.max_steps={done + 1}"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in metrics_rows(out)] == list(range(1, done + 2))


# ---------------------------------------------------------------- metrics.jsonl


def _metrics(out: Path) -> Metrics:
    return Metrics(LoggerConfig(name="none"), out, rank=0, max_steps=10, config={})


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_line_is_named(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_rows(f)] == [1, 2]
    _metrics(tmp_path).truncate_after(2)
    assert f.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert not list(tmp_path.glob("*.tmp"))
    f.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{f}:2: not a metrics row"):
        read_rows(f)
    assert [r["step"] for r in read_rows(f, tolerant=True)] == [1, 3]


def test_plot_draws_a_run_whose_lines_are_torn(tmp_path):
    from training.plot import plot

    rows = [{"step": i, "loss": 3.0 - i / 10, "lr": 1e-4, "tokens_per_s": 100.0, "samples_per_s": 2.0}
            for i in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text[:40] + "\n" + text + '{"step": 5, "lo')
    assert plot([tmp_path])


@pytest.mark.slow
def test_a_rerun_without_a_checkpoint_starts_metrics_over_and_a_resume_drops_a_torn_line(tmp_path):
    # a run killed before its first checkpoint left rows (and a torn line) behind
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "l')
    run_stage(tmp_path, ["trainer.max_steps=2", "trainer.save_every=1"])
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0
    (tmp_path / "DONE").unlink()  # killed after its step-2 checkpoint, while writing the row of step 3
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.')
    run_stage(tmp_path, ["trainer.max_steps=3", "trainer.save_every=1"])
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------- data-skip counts


def _doc(text: str) -> bytes:
    return json.dumps({"content": [{"type": "text", "text": text}]}).encode()


BAD = {  # reason -> (members) of one sample whose only problem is that reason
    "missing_json": {"txt": b"no record here"},
    "bad_json": {"json": b"{not json"},
    "pickle_member": {"json": _doc("with a pickle"), "pkl": b"\x80\x04K\x01."},
    "missing_media": {"json": json.dumps({"content": [{"type": "image", "image": "0.png"}]}).encode()},
    "undecodable_image": {"json": json.dumps({"content": [{"type": "image", "image": "0.png"}]}).encode(),
                          "0.png": b"not a png"},
}


@pytest.mark.slow
def test_skipped_and_dropped_counts_reach_metrics_rows_and_done(tmp_path):
    shard = tmp_path / "mixed.tar"
    samples = [(f"good{i:03d}", {"json": _doc(f"sample number {i} is a short document.")}) for i in range(24)]
    samples += [(f"bad_{reason}", members) for reason, members in BAD.items()]
    samples.append(("long", {"json": _doc("word " * 2000)}))  # longer than seq_len: dropped/mixed/too_long
    write_tar(str(shard), samples)
    out = tmp_path / "run"
    run_stage(out, ["trainer.max_steps=3", "data=shards", f"data.sources=[{{name: mixed, urls: '{shard}'}}]",
                    "data.max_bad_fraction=0.9", "data.num_workers=2", "trainer.micro_batch_size=1"])
    last, done = metrics_rows(out)[-1], json.loads((out / "DONE").read_text())
    for reason in BAD:
        assert last[f"skipped/mixed/{reason}"] >= 1, (reason, last)
    assert last["dropped/mixed/too_long"] >= 1
    counts = {k: v for k, v in last.items() if k.startswith(("skipped/", "dropped/"))}
    assert {k: done[k] for k in counts} == counts


# ---------------------------------------------------------------- a checkpoint write that fails


@pytest.mark.slow
def test_a_failed_checkpoint_write_removes_its_tmp_and_names_the_path(tmp_path):
    """A real write failure from the kernel: the file-size limit (RLIMIT_FSIZE) stops the checkpoint's first large
    file, as a full disk would (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    out = tmp_path / "run"
    conftest.compose([])  # nothing to do with the limit: warm imports outside the limited child
    _shapes_sources(("caption",))  # the shapes cache exists before the child (whose writes are capped)
    limit = 2 * 2**20

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "training.train", conftest.SHORT_ROWS, "trainer.max_steps=2",
                        "logger=none", "model=tiny_qwen2_vl", "data.shapes.tasks=[caption]", f"output_dir={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env(), preexec_fn=cap)
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert f"writing checkpoint {out / 'checkpoints' / 'step_00000002.tmp'}" in err, err[-3000:]
    assert "re-running the same command resumes" in err
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / "checkpoints" / "latest").exists()
