"""Hydra entry point for one stage: `python -m training.train stage=... model=... [overrides]`.

Hydra stays here: the composed config is turned into plain dataclasses once (unknown keys fail), and the
process layout (rank, world size) is read from the launcher's environment once and passed down.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("training")


def to_job(cfg: DictConfig):
    """DictConfig -> JobConfig; a key that a component's dataclass does not know is a clear error."""
    from training.loop import JobConfig

    schema = OmegaConf.structured(JobConfig)
    for key in cfg:
        if key not in schema:
            raise ValueError(f"unknown top-level config key {key!r}; known: {sorted(schema.keys())}")
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as e:  # omegaconf's message names the key and the dataclass
        raise ValueError(f"invalid config: {e}".replace("\n", " | ")) from None
    return OmegaConf.to_object(merged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Joins the process group torchrun (or SLURM via torchrun) set up; a plain `python` run is world 1."""
    import torch

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def run_config(cfg: DictConfig) -> dict | None:
    from training.loop import run

    job = to_job(cfg)
    rank, world = init_distributed()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return run(job, OmegaConf.to_yaml(cfg, resolve=True), rank, world)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = run_config(cfg)
    except (ValueError, NotImplementedError) as e:
        log.error("%s", e)
        sys.exit(2)
    if summary and summary.get("interrupted"):
        sys.exit(143)  # checkpointed on a signal, not done: launchers requeue or re-run


if __name__ == "__main__":
    main()
