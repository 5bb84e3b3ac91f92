"""Shared helpers: compose configs like the CLI does and run stages in-process (one gloo rank)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


# the tiny models' samples are 12-110 tokens: short packed rows keep CPU steps fast (stages default to 8192)
SHORT_ROWS = "stage.seq_len=256"


def _short(overrides: list[str]) -> list[str]:
    return overrides if any(o.startswith("stage.seq_len=") for o in overrides) else [*overrides, SHORT_ROWS]


def run_stage(tmp: Path, overrides: list[str]) -> dict:
    """Runs one stage in this process, exactly as `python -m training.train` would after composing."""
    from training.train import run_config

    return run_config(compose(["logger=none", f"output_dir={tmp}", *_short(overrides)]))


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """This process's environment without the rendezvous variables its in-process runs set."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def cli(args: list[str], cwd=REPO, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["training.train", *_short(args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean_env())


def metrics_rows(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load_hf(path: Path) -> dict:
    """The exported weights as transformers loads them (keyed by module parameter names)."""
    import json

    from training.models import FAMILIES

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    cls = next(f.model_cls for f in FAMILIES.values() if f.model_type == model_type)
    return dict(cls.from_pretrained(str(path)).named_parameters())


@pytest.fixture(scope="session")
def initial_exports(tmp_path_factory):
    """Each tiny family's starting weights, exported by `trainer.max_steps=0` (built lazily, once)."""
    cache: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in cache:
            out = tmp_path_factory.mktemp(f"init_{model}")
            run_stage(out, [f"model={model}", "trainer.max_steps=0"])
            cache[model] = load_hf(out / "hf")
        return cache[model]

    return get
