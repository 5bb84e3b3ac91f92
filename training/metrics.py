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

    def start_over(self) -> None:
        """A run with no checkpoint starts at step 1: rows a killed earlier attempt logged are dropped."""
        if self.rank == 0 and self.path.is_file():
            _write_atomic(self.path, [])

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged after its last checkpoint, so steps are not duplicated."""
        if self.rank == 0 and self.path.is_file():
            _write_atomic(self.path, [r for r in read_rows(self.path) if r["step"] <= step])

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


def read_rows(path: Path, tolerant: bool = False) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short by a kill is dropped (with a warning); a bad line
    before it means the file was edited or damaged otherwise: an error naming the file and line (`tolerant`,
    for plots and reports: skipped with a warning)."""
    lines = [(i, l) for i, l in enumerate(Path(path).read_text().splitlines(), 1) if l.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a metrics row")
        except ValueError as e:
            if n == len(lines) - 1 or tolerant:
                log.warning("%s:%d: skipping a line that is not a metrics row (%s)", path, i, e)
                continue
            raise ValueError(f"{path}:{i}: not a metrics row ({e}); repair or delete that line") from None
        rows.append(row)
    return rows


def _write_atomic(path: Path, rows: list[dict]) -> None:
    """Rewrite the file as a whole or not at all (a kill mid-write leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
