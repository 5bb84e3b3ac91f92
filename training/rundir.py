"""Who owns an output directory: one run at a time, and no trainer outlives its launcher.

Two trainers in one directory corrupt each other silently (each rank reads `checkpoints/latest` on its own,
steps are logged twice with different losses). `RunLock` is an exclusive `flock` on DIR/.lock, taken by rank 0
before the directory is read and held for the run's life; the kernel drops it when the process dies, however it
dies, so a stale lock never blocks a restart. flock works across hosts on NFSv4 (Linux maps it to a POSIX lock)
and on Lustre mounted with `-o flock`.

torchrun starts each worker in its own session, so a SIGKILL of torchrun's process group leaves the workers
training with no launcher. `watch_launcher` notices the parent is gone and stops the trainer the way a
preemption would (SIGTERM: checkpoint at the end of the step), then exits hard if that takes too long.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("training")


class RunLock:
    """`with RunLock(dir):` holds DIR/.lock exclusively, or raises ValueError naming the holder."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ValueError(f"output_dir {self.path.parent} is in use by another run ({holder}); two runs in one "
                             f"directory would overwrite each other's checkpoints and metrics. Wait for it to end or "
                             f"stop it, or pass another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (removing it would race a waiting run)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


_watching = False


def watch_launcher(grace_s: float = 120.0, poll_s: float = 1.0) -> None:
    """Under torchrun: once the launcher (our parent) is gone, SIGTERM ourselves (the stop-on-signal path
    checkpoints at the end of the step), and exit after `grace_s` if the run has not ended by then (a rank
    waiting on a collective whose peers died would wait for ever). Plain `python` runs are left alone: a
    shell that exits under nohup is not a launcher that failed."""
    global _watching
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watching:
        return
    _watching, parent = True, os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the launcher (pid %d) is gone: checkpointing at the end of this step and stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        log.error("still running %.0f s after the launcher died: exiting", grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
