"""Real torchvision (Python side) for parity tests against HF's torchvision backend, on a CPU-only torch.

torchvision has no CPU wheel for torch 2.13 here; its CUDA wheel's Python code runs on CPU torch, but its compiled
ops fail to load and its import then stops at registering fake kernels for `torchvision::nms`/`qnms`. Declaring
those two op schemas first lets it import; the code under test (`transforms.v2.functional.resize`, `normalize`,
`pil_to_tensor`) is pure Python over torch ops. Installed by `.ci/run` with
`pip install --no-deps --target .cache/torchvision torchvision==0.28.0` (or any dir in $QWENVL_TORCHVISION).

Importing torchvision makes transformers pick its torchvision backend, so the tests that need it run in a
subprocess (`run_with_torchvision`) and the main test process stays PIL-backed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install --no-deps --target .cache/torchvision torchvision==0.28.0"


def location() -> Optional[Path]:
    p = Path(os.environ.get("QWENVL_TORCHVISION", REPO / ".cache" / "torchvision"))
    return p if (p / "torchvision" / "__init__.py").is_file() else None


def import_torchvision():
    """Import torchvision from `location()` (call only in a process that may switch HF to its torchvision backend)."""
    import torch

    where = location()
    if where is None:
        raise ImportError(f"torchvision is not installed for the parity tests: run `{INSTALL}` in {REPO}")
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision._lib = lib  # keep the definitions alive
    import torchvision

    return torchvision


def run_with_torchvision(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter after `import_torchvision()`; the caller asserts on its return code."""
    prelude = "from tests.hf_torchvision import import_torchvision; import_torchvision()\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
