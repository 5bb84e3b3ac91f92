"""One stage: build the components from their configs, train, checkpoint, export. No stage-specific code."""
from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data.encode import IGNORE, Encoder
from data.loader import IndexedLoader, Layout
from data.shapes import ShapesConfig
from stages import StageConfig, build_objective
from training import models
from training.checkpoint import Checkpointer
from training.engine import EngineConfig, initialize
from training.metrics import LoggerConfig, Metrics

log = logging.getLogger("training")


@dataclass
class TrainerConfig:
    max_steps: int = 20
    micro_batch_size: int = 2
    grad_accum: int = 1
    save_every: int = 10  # also saved at the last step; 0 = only at the last step
    keep_checkpoints: int = 2
    seed: int = 0


@dataclass
class JobConfig:
    model: models.ModelConfig = field(default_factory=models.ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: ShapesConfig = field(default_factory=ShapesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/default"


def _sum(values: list[float], device) -> list[float]:
    """All-reduce (sum) a few floats in float64 so the logged totals do not depend on the world size."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _add_sources(into: dict, part: dict) -> None:
    """Adds {source: [ce_sum, tokens]} of `part` into `into`."""
    for k, (s, n) in part.items():
        acc = into.setdefault(k, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + s, acc[1] + n


def _gather_sources(per_source: dict) -> dict:
    """Per-source token-mean CE over all ranks (the sources seen may differ between ranks)."""
    parts = [per_source]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, per_source)
    total: dict = {}
    for part in parts:
        _add_sources(total, part)
    return {f"loss/{k}": s / n for k, (s, n) in sorted(total.items()) if n > 0}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _full_state_dict(engine) -> dict:
    """Full weights on every rank; partitioned (ZeRO-3) weights are gathered first."""
    import deepspeed

    module = engine.module
    gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
              if engine.zero_optimization_partition_weights() else nullcontext())
    with gather:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class _StopOnSignal:
    """SIGTERM/SIGUSR1 (preemption, SLURM's --signal) ask for a checkpoint at the end of the current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = signum


@dataclass
class Run:
    """Everything one stage run holds after set-up."""

    job: JobConfig
    out: Path
    rank: int
    world: int
    bundle: models.Bundle
    groups: dict  # parameter names per group (vision, merger, llm)
    loader: IndexedLoader
    objective: object
    engine: object = None
    ckpt: Checkpointer | None = None
    metrics: Metrics | None = None
    start: int = 0


def run(job: JobConfig, resolved_yaml: str, rank: int, world: int) -> dict | None:
    out = Path(job.output_dir)
    if (out / "DONE").is_file():
        log.info("%s/DONE exists: this stage already finished; nothing to do", out)
        return json.loads((out / "DONE").read_text())
    r = _setup(job, resolved_yaml, out, rank, world)
    if job.trainer.max_steps == 0:  # export the starting weights unchanged; no engine needed
        if rank == 0:
            models.export_hf(r.bundle, r.bundle.model.state_dict(), out / "hf")
        return _finish(out, rank, {"steps": 0, "final_loss": None})
    _start_engine(r, resolved_yaml)
    with _StopOnSignal() as stop:
        summary = _train(r, stop)
    r.metrics.close()
    if summary.get("interrupted"):
        return summary
    state_dict = _full_state_dict(r.engine)
    if rank == 0:
        models.export_hf(r.bundle, state_dict, out / "hf")
    return _finish(out, rank, summary)


def _setup(job: JobConfig, resolved_yaml: str, out: Path, rank: int, world: int) -> Run:
    tr, stage = job.trainer, job.stage
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(tr, key) < 1:
            raise ValueError(f"trainer.{key}={getattr(tr, key)} must be at least 1")
    if tr.max_steps < 0:
        raise ValueError(f"trainer.max_steps={tr.max_steps} must be >= 0 (0 exports the starting model)")
    torch.manual_seed(tr.seed + rank)
    bundle = models.build(job.model)
    groups = models.param_groups(bundle.model, bundle.family)
    models.apply_trainable(bundle.model, groups, stage.trainable)
    objective = build_objective(stage.objective, stage.loss_reduction)  # fails before any compute
    layout = Layout(rank=rank, world=world, micro_batch=tr.micro_batch_size, grad_accum=tr.grad_accum,
                    seq_len=stage.seq_len)
    loader = IndexedLoader(job.data, Encoder(bundle.tokenizer, bundle.image_processor), layout,
                           pad_id=bundle.tokenizer.pad_token_id)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(resolved_yaml)
    return Run(job, out, rank, world, bundle, groups, loader, objective)


def _start_engine(r: Run, resolved_yaml: str) -> None:
    """DeepSpeed engine, metrics sinks, and the state of the latest checkpoint if there is one."""
    job, tr = r.job, r.job.trainer
    r.engine, _ = initialize(r.bundle.model, r.groups, job.stage, job.engine, tr.micro_batch_size, tr.grad_accum,
                             r.world, tr.max_steps)
    r.ckpt = Checkpointer(r.out / "checkpoints", r.rank, tr.keep_checkpoints)
    r.metrics = Metrics(job.logger, r.out, r.rank, tr.max_steps, config={"yaml": resolved_yaml})
    tag = r.ckpt.latest_tag()
    if tag is not None:
        state = r.ckpt.load(r.engine, tag)
        r.start = state["step"]
        r.loader.load_state_dict(state["data"])
        r.metrics.truncate_after(r.start)
        log.info("resumed from %s at step %d", r.out / "checkpoints" / tag, r.start)


def _train(r: Run, stop: _StopOnSignal) -> dict:
    """The loop: micro-batches of a step, global weight sum, forward/backward, step, metrics, checkpoint."""
    tr, stage, engine, world = r.job.trainer, r.job.stage, r.engine, r.world
    loss, tokens_seen = None, 0.0
    for step in range(r.start, tr.max_steps):
        t0 = time.time()
        # learning rates this step uses; "lr" is the stage's base lr (group lr / its multiplier)
        lrs = {f"lr/{g['name']}": g["lr"] for g in engine.optimizer.param_groups}
        g0 = engine.optimizer.param_groups[0]
        base_lr = g0["lr"] / float(stage.lr_mult.get(g0["group"], 1.0))
        micro = r.loader.next_step()
        for mb in micro:
            mb["weights"] = r.objective.weights(mb)
        t_data = time.time() - t0
        # the global weight sum over all ranks and micro-batches: the gradient is then split-independent
        (weight_sum,) = _sum([float(sum(mb["weights"].sum() for mb in micro))], engine.device)
        loss_sum, per_source = 0.0, {}
        for mb in micro:
            ls, stats = r.objective.loss_sum(engine, _to(mb, engine.device))
            # DeepSpeed averages gradients over ranks: scale by world so the reduced gradient is the sum
            engine.backward(ls * (world / weight_sum), scale_wrt_gas=False)
            engine.step()
            loss_sum += float(ls.detach())
            _add_sources(per_source, stats["per_source"])
        tok = sum(float(mb["attention_mask"].sum()) for mb in micro)
        sup = sum(float((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro)
        # the stop flag rides on this all-reduce, so every rank sees a signal any rank got
        loss_sum, tok, sup, stopping = _sum([loss_sum, tok, sup, float(stop.signum is not None)], engine.device)
        loss = loss_sum / weight_sum
        tokens_seen += tok
        dt = time.time() - t0
        row = {"step": step + 1, "loss": loss, "lr": base_lr, "tokens": tok,
               "supervised_tokens": sup, "tokens_per_s": tok / dt, "step_time_s": dt,
               "data_wait_frac": t_data / dt, "grad_norm": float(engine.get_global_grad_norm() or 0.0)}
        row.update(lrs)
        row.update(_gather_sources(per_source))
        r.metrics.log(row, r.start)
        if (tr.save_every and (step + 1) % tr.save_every == 0) or step + 1 == tr.max_steps or stopping:
            r.ckpt.save(engine, step + 1, {"step": step + 1, "data": r.loader.state_dict()})
        if stopping:
            log.warning("stopping on a signal: checkpoint written at step %d; re-run the same command to resume",
                        step + 1)
            return {"interrupted": True, "step": step + 1}
    return {"steps": tr.max_steps, "final_loss": loss, "tokens": tokens_seen}


def _finish(out: Path, rank: int, summary: dict) -> dict:
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        summary["hf"] = str(out / "hf")
        (out / "DONE").write_text(json.dumps(summary, indent=1) + "\n")  # written last of all
    return summary
