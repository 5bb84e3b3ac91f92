"""Metrics sinks: metrics.jsonl (rank 0), a console progress line, and wandb (offline by default)."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("training")


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "qwen-vl-train"
    mode: str = "offline"  # offline | online | disabled
    run_name: str = ""


class Metrics:
    def __init__(self, cfg: LoggerConfig, output_dir: Path, rank: int, max_steps: int, config: dict):
        self.rank, self.max_steps = rank, max_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.t0 = time.time()
        self.wandb = None
        if rank == 0 and cfg.name == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.project, name=cfg.run_name or Path(output_dir).name,
                                    dir=str(output_dir), mode=cfg.mode, config=config, resume="allow")
        elif cfg.name not in ("wandb", "none"):
            raise ValueError(f"logger.name={cfg.name!r}; choose wandb or none")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged after its last checkpoint, so steps are not duplicated."""
        if self.rank != 0 or not self.path.is_file():
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        self.path.write_text("".join(l + "\n" for l in keep))

    def log(self, row: dict, start_step: int) -> None:
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        elapsed = time.time() - self.t0
        eta = elapsed / max(1, step - start_step) * (self.max_steps - step)
        loss = "skipped" if row.get("loss") is None else f"{row['loss']:.4f}"
        log.info("step %d/%d  loss %s  lr %.2e  tok/s %.0f  eta %s", step, self.max_steps, loss,
                 row["lr"], row["tokens_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
