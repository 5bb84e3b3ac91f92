"""What a user sees: third-party noise kept off the console and in train.log (training/console.py), Ctrl-C that
checkpoints (a second one stops at once), the start/resume line, and `--cfg job` printing the resolved config."""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import REPO, SHORT_ROWS, clean_env
from training.metrics import read_rows

# lines that are build/loader chatter or known deprecations (training/console.py): train.log only
NOISE = ("compilers.C.base", "built successfully", "FutureWarning", "Writing model shards",
         "torch_extensions")
ALL_GATHER = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
              "`torch.distributed.all_gather_single` instead.")


@pytest.fixture
def hydra_like_logging(tmp_path):
    """The root logger as Hydra's job logging leaves it (a console StreamHandler and train.log), restored after."""
    from transformers.utils import logging as hf_logging

    root, py_warnings = logging.getLogger(), logging.getLogger("py.warnings")
    saved = (root.handlers[:], root.level, py_warnings.filters[:], hf_logging.is_progress_bar_enabled())
    console, path = io.StringIO(), tmp_path / "train.log"
    fmt = logging.Formatter("[%(name)s][%(levelname)s] - %(message)s")
    handlers = [logging.StreamHandler(console), logging.FileHandler(path)]
    for h in handlers:
        h.setFormatter(fmt)
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    try:
        yield console, path
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            h.close()
        root.handlers[:], py_warnings.filters[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        if saved[3]:
            hf_logging.enable_progress_bar()


def test_build_output_and_known_warnings_reach_train_log_and_not_the_console(hydra_like_logging):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from training import console

    out, path = hydra_like_logging
    hub_bars_off = are_progress_bars_disabled()
    assert console.setup() == path
    # what `import deepspeed` and its op builds give: distutils' compiler lines, a print, its own logger
    logging.getLogger("compilers.C.base").info("gcc -c /tmp/x/test.c -o /tmp/x/test.o")
    with console.stdout_to_log():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    lib = logging.getLogger("test_console.lib")  # a library logger with its own handler, like DeepSpeed's
    own = io.StringIO()
    lib.addHandler(logging.StreamHandler(own))
    lib.propagate = False
    console.route_to_root("test_console.lib")
    lib.warning("a library warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):  # ZeRO-3 repeats it at every step
            warnings.warn(ALL_GATHER, FutureWarning)
            with warnings.catch_warnings():  # what resets a filter's "once" registry
                pass
        warnings.warn("something the user should see", UserWarning)
    logging.getLogger("compilers.C.base").warning("a compiler warning")  # WARNING and up always show
    logging.getLogger("training").info("step 1/2  loss 6.4")

    shown, kept = out.getvalue(), path.read_text()
    for line in ("gcc -c /tmp/x/test.c", "built successfully", "is deprecated"):
        assert line not in shown and line in kept, line
    assert kept.count("all_gather_into_tensor` is deprecated") == 1  # once per process, however often it came
    for line in ("step 1/2  loss 6.4", "something the user should see", "a compiler warning", "a library warning"):
        assert line in shown and line in kept, line
    assert own.getvalue() == ""  # the library's warning went through the root handlers instead
    assert "[stdout][INFO] - DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in kept
    # torch's extension loader (its logger's level is torch's: INFO reaches no handler unless TORCH_LOGS asks)
    record = logging.LogRecord("torch.utils.cpp_extension", logging.INFO, __file__, 1,
                               "Using /root/.cache/torch_extensions as PyTorch extensions root...", None, None)
    assert not console.ConsoleFilter().filter(record)
    # transformers' progress bars ("Writing model shards") off; the hub's download bars as they were
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled() == hub_bars_off


def test_a_second_ctrl_c_stops_at_once_without_waiting_for_the_step():
    from training.loop import _StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with _StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a checkpoint at the end of the step is asked for
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    with _StopOnSignal() as stop:  # SIGTERM then Ctrl-C: the checkpoint is already asked for; Ctrl-C aborts
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # restored after the loop


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_143_with_a_quiet_console(tmp_path):
    """One process, tiny model: the fresh start says so, Ctrl-C checkpoints the step it is on and exits 143; the
    console has none of DeepSpeed's build lines, which train.log keeps."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", SHORT_ROWS, "logger=none", "trainer.max_steps=100000",
           "trainer.save_every=0", f"output_dir={out}"]
    with (tmp_path / "console.txt").open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and read_rows(out / "metrics.jsonl", tolerant=True)):
            assert proc.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
            assert time.time() < deadline, "no step logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    shown = (tmp_path / "console.txt").read_text()
    assert rc == 143, shown[-3000:]
    step = read_rows(out / "metrics.jsonl")[-1]["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert "KeyboardInterrupt" not in shown and "Traceback" not in shown, shown[-3000:]
    for line in (f"no checkpoint in {out / 'checkpoints'}: starting from step 0", "Ctrl-C: checkpointing",
                 f"stopping on a signal: checkpoint written at step {step}"):
        assert line in shown, shown[-3000:]
    noisy = [l for l in shown.splitlines() if any(n in l for n in NOISE)]
    assert not noisy, noisy
    kept = (out / "train.log").read_text()
    assert "[compilers.C.base][INFO] - gcc" in kept and "[stdout][INFO] - DeepSpeed" in kept, kept[-3000:]


def test_cfg_job_prints_the_resolved_config():
    from training.train import resolve_printed_config

    assert resolve_printed_config(["--cfg", "job"]) == ["--cfg", "job", "--resolve"]
    assert resolve_printed_config(["-c", "all", "--resolve"]) == ["-c", "all", "--resolve"]
    assert resolve_printed_config(["--cfg", "job", "--no-resolve"]) == ["--cfg", "job"]
    assert resolve_printed_config(["trainer.max_steps=2"]) == ["trainer.max_steps=2"]
    run = [sys.executable, "-m", "training.train", "model=tiny_qwen2_vl", "stage=sft", "--cfg", "job"]
    r = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "output_dir: runs/tiny_qwen2_vl_sft\n" in r.stdout and "${" not in r.stdout, r.stdout
    r = subprocess.run(run + ["--no-resolve"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=clean_env())
    assert r.returncode == 0 and "output_dir: runs/${model.name}_${stage.name}\n" in r.stdout, r.stderr[-3000:]
