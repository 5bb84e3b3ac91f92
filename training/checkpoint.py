"""Resumable checkpoints: the engine's model/optimizer/scheduler files plus our per-rank trainer state.

Layout: checkpoints/step_00000010/{engine files, trainer_rank{r}.json, rng_rank{r}.safetensors} and
checkpoints/latest naming the newest complete one. Every rank writes into step_XXXXXXXX.tmp; after all
ranks finished, rank 0 renames it to step_XXXXXXXX and then replaces `latest` (tmp + rename), so a crash
mid-save leaves only a .tmp directory behind and the previous checkpoint in charge.
Our own state is JSON and safetensors; the engine reads its own files without unpickling (the DeepSpeed
engine: torch.load(weights_only=True) with an allow-list), so resuming never runs arbitrary pickle code.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def _tag(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep: int):
        self.root, self.rank, self.keep = Path(root), rank, keep

    def latest_tag(self) -> Optional[str]:
        """The checkpoint to resume from, as rank 0 reads it, on every rank: ranks reading `latest` on their own
        could see different files while another job (or a dying one) writes it."""
        found = [self._latest_tag() if self.rank == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(found, src=0)
        if isinstance(found[0], Exception):
            raise found[0]
        return found[0]

    def _latest_tag(self):
        try:
            return self._read_latest()
        except ValueError as e:  # raised on every rank, not on rank 0 alone
            return e

    def _read_latest(self) -> Optional[str]:
        f = self.root / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        if not (self.root / tag).is_dir():
            raise ValueError(f"{f} names {tag!r} but {self.root / tag} does not exist; remove {f} to start "
                             f"over or restore the checkpoint directory")
        return tag

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag = _tag(step)
        work = self.root / f"{tag}.tmp"
        if self.rank == 0 and work.exists():  # left by a crash during an earlier save of this step
            shutil.rmtree(work)
        self._barrier()
        error = None
        try:
            engine.save(work)
            (work / f"trainer_rank{self.rank}.json").write_text(json.dumps(trainer_state, indent=1))
            save_file({"torch": torch.get_rng_state()}, str(work / f"rng_rank{self.rank}.safetensors"))
        except (OSError, RuntimeError) as e:  # torch's writer says "unexpected pos ..." for a full disk
            error = e
        if not self._all_ok(error is None, engine.device):
            if self.rank == 0:
                shutil.rmtree(work, ignore_errors=True)  # a half-written checkpoint must not keep the disk full
            raise RuntimeError(_write_failed(work, error)) from error
        final = self.root / tag
        if self.rank == 0:
            if final.exists():  # renamed by a run that crashed before moving `latest`: never the latest
                shutil.rmtree(final)
            os.replace(work, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / "latest")
            self._prune(tag)
        self._barrier()
        return final

    @staticmethod
    def _all_ok(ok: bool, device) -> bool:
        """Did every rank write its part (an all-reduce that is also the barrier before the rename)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return ok
        t = torch.tensor([int(ok)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    @staticmethod
    def _barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    def _prune(self, newest: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != newest:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, engine, tag: str) -> dict:
        """Restores engine state and this rank's RNG; returns this rank's trainer state."""
        d = self.root / tag
        written_by = len(list(d.glob("trainer_rank*.json")))
        world = dist.get_world_size() if dist.is_initialized() else 1
        if written_by != world:  # before the engine, whose own error does not say what to do
            raise ValueError(f"{d} was written by {written_by} data-parallel ranks but this run has {world}; the "
                             f"optimizer shards and each rank's data position belong to the original layout, so "
                             f"resume with {written_by} processes, or start a new stage from its weights "
                             f"(model.path={d.parent.parent}/hf after it finishes)")
        engine.load(d)
        f = d / f"trainer_rank{self.rank}.json"
        if not f.is_file():
            raise ValueError(f"{f} is missing: the checkpoint was written by fewer ranks than this run has; "
                             f"resume with the original number of processes")
        torch.set_rng_state(load_file(str(d / f"rng_rank{self.rank}.safetensors"))["torch"])
        return json.loads(f.read_text())


def _write_failed(work: Path, error: Exception | None) -> str:
    """What a failed checkpoint write tells the user: which path, how much space is left, what was kept."""
    try:
        free = shutil.disk_usage(work.parent).free
    except OSError:
        free = None
    where = f"{work} (free space there: {free / 2**20:.1f} MiB)" if free is not None else str(work)
    why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write its part"
    full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20)
    hint = "no space left on device: free space or point output_dir at a larger file system" if full else \
        "check that the directory is writable and has room"
    return (f"writing checkpoint {where} failed ({why}); {hint}. The unfinished checkpoint was removed and "
            f"the previous one (checkpoints/latest) is still in charge, so re-running the same command resumes")
