"""The pipeline-level console view: which step runs, its progress (from its metrics.jsonl), step and chain ETA.

The trainer's own console output goes to each step's console.log; the terminal shows one line per step that
updates in place on a TTY (a line every `every_s` seconds otherwise, so CI logs stay short).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def last_row(metrics: Path) -> dict | None:
    """The newest complete row of a metrics.jsonl (a line being written is ignored)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ChainProgress:
    def __init__(self, name: str, steps: list, stream=None, every_s: float = 10.0):
        self.name, self.steps = name, steps
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.time()
        self.step_t0 = None
        self.first_step = None  # (time, step) of the first metrics row this run saw: the rate's origin
        self.rate = None  # seconds per training step, measured on the latest step
        self.startup = None  # seconds from launch to the first metrics row (process start, model, engine)
        self.last_print = 0.0

    def _pos(self, step) -> str:
        return f"[{self.name} {self.steps.index(step) + 1}/{len(self.steps)} {step.name}]"

    def _write(self, text: str, transient: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("" if transient else "\n"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self._write(text)

    def skipped(self, step) -> None:
        self._write(f"{self._pos(step)} DONE exists: skipped")

    def start(self, step) -> None:
        self.step_t0, self.first_step = time.time(), None
        self._write(f"{self._pos(step)} {step.cfg.stage}, {step.max_steps} steps -> {step.out}  (log: {step.log_path})")

    def _chain_eta(self, step, remaining_here: float | None) -> float | None:
        if remaining_here is None or self.rate is None:
            return None
        later = [s for s in self.steps[self.steps.index(step) + 1:] if not s.done]
        return remaining_here + sum(s.max_steps * self.rate + (self.startup or 0.0) for s in later)

    def update(self, step, final: bool = False) -> None:
        row = last_row(step.out / "metrics.jsonl")
        now = time.time()
        if row is None:
            if not final and (self.tty or now - self.last_print >= self.every_s):
                self._write(f"{self._pos(step)} starting ({hms(now - self.step_t0)})", transient=True)
                self.last_print = now
            return
        done = row["step"]
        if self.first_step is None:
            self.first_step = (now, done)
            self.startup = now - self.step_t0
        t1, s1 = self.first_step
        if done > s1:
            self.rate = (now - t1) / (done - s1)
        remaining = (step.max_steps - done) * self.rate if self.rate is not None else None
        if final or self.tty or now - self.last_print >= self.every_s:
            self.last_print = now
            loss = f"loss {row['loss']:.4f}" if row.get("loss") is not None else \
                f"skipped ({row.get('skipped') or 'no loss'})"  # e.g. RL: every group's rewards equal
            self._write(f"{self._pos(step)} step {done}/{step.max_steps}  {loss}  "
                        f"lr {row['lr']:.2e}  step eta {hms(remaining)}  chain eta {hms(self._chain_eta(step, remaining))}",
                        transient=not final)

    def evaluated(self, step, ev: dict | None) -> None:
        if not ev:
            return
        a, b = ev.get("start"), ev.get("end")
        if not a or not b:
            return
        self._write(f"{self._pos(step)} held-out: caption loss {a['caption_loss']:.3f} -> {b['caption_loss']:.3f}, "
                    f"VQA accuracy {a['vqa_accuracy']:.2f} -> {b['vqa_accuracy']:.2f} (chance {b['vqa_chance']:.2f})")
