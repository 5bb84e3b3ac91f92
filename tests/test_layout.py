"""The seams of issue 13, held in place: DeepSpeed only behind the Engine protocol, no forward hooks on HF modules,
the loop free of duck typing."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("training", "stages", "data", "launch") for p in (REPO / d).rglob("*.py")]


def _matches(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(REPO)) for p in PRODUCT if rx.search(p.read_text()))


def test_deepspeed_is_imported_by_its_engine_module_alone():
    assert _matches(r"^\s*(import deepspeed|from deepspeed)") == ["training/engines/deepspeed.py"]


def test_the_product_registers_no_forward_hooks():
    assert _matches(r"register_forward(_pre)?_hook") == []


def test_the_loop_asks_the_objective_through_its_protocol():
    loop = (REPO / "training/loop.py").read_text()
    assert "hasattr(" not in loop and "getattr(r.objective" not in loop and "getattr(obj" not in loop
