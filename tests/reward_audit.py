"""An audit hook (sys.addaudithook) that records imports, code execution, process starts, links and writes while
a check runs, to prove a refused reward spec imported and ran nothing.

Audit hooks cannot be removed, so the hook is installed once and records only inside `watching()`. The
`import` event fires only for modules not yet in sys.modules, so tests also spy on importlib.import_module.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

FORBIDDEN = ("import", "exec", "compile", "subprocess.Popen", "os.system", "os.symlink", "os.link", "os.remove",
             "os.rename", "os.fork", "os.forkpty", "ctypes.dlopen", "shutil.rmtree")
PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_state = {"installed": False, "active": False, "events": [], "allowed": "\0"}


def _hook(event: str, args: tuple) -> None:
    if not _state["active"]:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
        if writing and not str(path).startswith(_state["allowed"]):
            _state["events"].append(("open-for-write", str(path)))
    elif event in FORBIDDEN or event.startswith(PREFIXES):
        _state["events"].append((event, repr(args[:1])[:200]))


@contextmanager
def watching(allowed_dir=None):
    """Yields the list of forbidden events seen inside the block (writes under `allowed_dir` are allowed)."""
    if not _state["installed"]:
        sys.addaudithook(_hook)
        _state["installed"] = True
    events: list = []
    _state.update(events=events, allowed=str(allowed_dir) if allowed_dir else "\0")
    _state["active"] = True
    try:
        yield events
    finally:
        _state["active"] = False


def evil_module(directory, name: str) -> tuple[str, str]:
    """Writes module `name` into `directory` (put it on sys.path) that creates a marker file when imported;
    returns (module name, marker path)."""
    marker = os.path.join(str(directory), f"{name}.imported")
    with open(os.path.join(str(directory), f"{name}.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').write('imported')\n\ndef score(completion, answer, **kw):\n    return 1.0\n")
    return name, marker


def crafted(module: str) -> list:
    """Reward specs a third-party shard could carry to run code: a shell through subprocess.run and its options,
    eval of the model's output, a file-system write, and a module whose import has a side effect."""
    return [{"name": "subprocess:run", "executable": "/bin/sh", "input": "touch /tmp/pwned", "text": True},
            "builtins:eval", {"name": "os:symlink", "dst": "/tmp/pwned_link"}, f"{module}:score", module,
            {"name": module, "x": 1}]
