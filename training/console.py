"""What the trainer's console shows, and what only its log file keeps.

Hydra's job logging gives every `python -m training.train` process two root handlers: the console (stdout) and
`output_dir/train.log` (a FileHandler). `setup()` (called first thing in training.train.main) keeps known
third-party noise off the console and in train.log:

- DeepSpeed's op-build output that goes through Python logging: distutils' compiler commands (`gcc ... test.c`,
  `gcc ... -laio`: `import deepspeed` probes which ops can be built; logged by `compilers.C.base` at INFO) and,
  should it reach the root handlers, torch's extension loader (`torch.utils.cpp_extension` at INFO: "Using ...
  as PyTorch extensions root"; torch's loggers keep their own stderr handler at WARNING, so normally it does not);
- what DeepSpeed prints to stdout while it builds or loads its ops when the process group starts
  ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"): `stdout_to_log` turns those prints
  into log records (logger `stdout`);
- the known deprecation warnings of KNOWN_WARNINGS (Python warnings go to logging: `logging.captureWarnings`;
  train.log keeps each once per process);
- transformers' progress bars ("Writing model shards" at each export; the hub's download bars are left on).

Everything else, every warning and error included, still reaches the console. The JIT compilation itself
(ninja, gcc/nvcc) prints nothing: DeepSpeed builds with verbose=False, where torch pipes the compiler's output
and shows it only inside the error of a failed build. DeepSpeed's own logger (`DeepSpeed`, warnings and up),
which writes to stdout through a handler of its own, is routed through the root handlers (`route_to_root`), so
its warnings reach train.log as well as the console.
"""
from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

# loggers whose records below WARNING are build/loader chatter: train.log only
NOISE_LOGGERS = ("compilers", "distutils", "torch.utils.cpp_extension", "stdout")
# (category, message regex): deprecations in the libraries' own calls, nothing a user of this trainer can fix.
# torch deprecated these two collectives in favour of all_gather_single/reduce_scatter_single; DeepSpeed's ZeRO
# calls them under torchrun (ZeRO-2 at start-up, ZeRO-3 at every step)
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # megatron-core (engine=megatron) on a machine without its CUDA extensions: the torch fallbacks it then uses
    # are the ones training/engines/megatron.py is built and tested on
    (UserWarning, r"Transformer Engine and Apex are not installed|Apex is not installed"),
)
_KNOWN = [re.compile(msg) for _, msg in KNOWN_WARNINGS]


def _noise_logger(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NOISE_LOGGERS)


class ConsoleFilter(logging.Filter):
    """On the console handler: drops the records that only the log file keeps (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            msg = record.getMessage()
            return not any(p.search(msg) for p in _KNOWN)
        if record.levelno >= logging.WARNING:
            return True
        # distutils' own messages go through the root logger: known by their source file
        return not (_noise_logger(record.name) or "distutils" in Path(record.pathname).parts)


class KnownOnce(logging.Filter):
    """On logger `py.warnings`: each of KNOWN_WARNINGS is logged once per process. (A warnings filter with action
    "once" does not do that: the libraries' `warnings.catch_warnings()` blocks reset its registry, and ZeRO-3
    then repeats the two collectives' FutureWarnings at every step.)"""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for p in _KNOWN:
            if p.search(msg):
                if p.pattern in self.seen:
                    return False
                self.seen.add(p.pattern)
        return True


def console_handlers(root: logging.Logger | None = None) -> list[logging.Handler]:
    return [h for h in (root or logging.getLogger()).handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def log_file(root: logging.Logger | None = None) -> Path | None:
    files = [h for h in (root or logging.getLogger()).handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


def setup() -> Path | None:
    """Installs the console filter on the root logger's console handler(s), routes Python warnings to logging
    (each known one once per process: KnownOnce) and turns transformers' progress bars off. Returns the log file's path
    (None: Hydra's job logging is off, and the console is left as it is)."""
    for h in console_handlers():
        if not any(isinstance(f, ConsoleFilter) for f in h.filters):
            h.addFilter(ConsoleFilter())
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    if not any(isinstance(f, KnownOnce) for f in py_warnings.filters):
        py_warnings.addFilter(KnownOnce())
    _no_transformers_progress_bars()
    return log_file()


def _no_transformers_progress_bars() -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's off: those are the user's to choose
    if not hub_off:
        enable_progress_bars()


class _LineLog(io.TextIOBase):
    """A text stream whose complete lines become INFO records of `logger`."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.buf = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line.rstrip())
        return len(s)

    def flush(self) -> None:
        if self.buf.strip():
            self.logger.info("%s", self.buf.rstrip())
        self.buf = ""


@contextmanager
def stdout_to_log(name: str = "stdout"):
    """Python-level prints in the block become INFO records of logger `name` (train.log; not the console).
    The console handler keeps the stream it was given, so the trainer's own log lines still show; stderr and
    output written to the file descriptors directly are untouched."""
    sink = _LineLog(logging.getLogger(name))
    try:
        with redirect_stdout(sink):
            yield
    finally:
        sink.flush()


def route_to_root(name: str) -> None:
    """Logger `name` (a library's, with its own stream handler and propagate off: DeepSpeed's) hands its records
    to the root handlers instead: the console filter applies and train.log keeps them. Nothing changes while the
    root logger has no log file (Hydra's job logging off)."""
    if log_file() is None:
        return
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
    logger.propagate = True
