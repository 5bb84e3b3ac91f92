"""The Engine protocol: what the loop, checkpoints, objectives and export ask of a training engine.

An engine owns the model's placement (sharding, devices), its optimizer and LR schedule, gradient reduction
and its checkpoint files. The loop sees only this protocol, so a new engine (megatron-core with TP/PP) is an
implementation, not a change to the loop. `engine=` configs pick one by `engine.kind`; DeepSpeed
(training/engines/deepspeed.py) is the one today, and the only module that imports deepspeed.

Optimizer parameter groups and the LR schedule are engine-independent and live here: one torch param group per
(trainable group, decay/no-decay), so each carries the stage's per-group learning-rate multiplier, and only
trainable parameters get optimizer state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from stages import StageConfig
from training.parallel import ParallelConfig


@dataclass
class EngineConfig:
    """`engine=` config group (conf/engine/*.yaml)."""

    name: str = "zero2"
    kind: str = "deepspeed"  # the implementation (training/engines/<kind>.py): deepspeed | megatron
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    dtype: str = "fp32"  # fp32 | bf16
    raw: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config
    tp: int = 1  # megatron: tensor-parallel size (consecutive ranks of one replica)
    pp: int = 1  # megatron: pipeline-parallel size (stages of consecutive ranks; 1F1B schedule)
    ep: int = 1  # megatron, MoE models: expert-parallel size (data-parallel ranks that split the experts)
    vpp: int = 1  # megatron: virtual pipeline stages per pipeline rank (> 1: interleaved 1F1B)
    sequence_parallel: bool = False  # megatron, tp > 1: the layers' activations split over the TP ranks by sequence
    distributed_optimizer: bool = True  # megatron: Adam state (and bf16's fp32 weights) sharded over data parallel


def replica_size(cfg: EngineConfig, sp_size: int = 1) -> int:
    """Processes that train the same rows (consecutive ranks): an SP group (DeepSpeed) or a TP group (megatron).
    The data-parallel size is world / this."""
    return sp_size * (cfg.tp * cfg.pp if cfg.kind == "megatron" else 1)


class Engine(Protocol):
    """A model under training. `engine(batch, **kw)` runs the model step (training/vlm.py VLM.forward)."""

    model: torch.nn.Module  # the step module (a VLM) as the engine holds it
    device: torch.device
    world: int  # processes
    dp_size: int  # data-parallel ranks (world / sp_size): data shards and the loss normalisation count these
    dp_rank: int
    sp_size: int  # ranks of a sequence-parallel group: they train the same rows (training/sp.py)
    sp_rank: int  # rank in it
    replica_rank: int  # rank among the processes that train the same rows (SP or TP group); 0 counts them once
    groups: dict  # process groups by name: "dp", "sp", "tp", "pp"; None = the default group / none
    partitioned: bool  # parameters are sharded, so each module's forward is a collective on every rank

    def __call__(self, batch: dict, **kw): ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates d loss / d params; `loss` is this rank's share of the global mean (the engine undoes its own
        gradient averaging over data-parallel ranks)."""

    def forward_backward(self, micro: list[dict], fn, forward_only: bool = False, model=None) -> list[tuple]:
        """Runs `fn(micro_batch on the device)` -> (the loss to back-propagate, the objective's detached loss sum,
        its stats) for each of the step's micro-batches and back-propagates each loss (not with `forward_only`:
        held-out scoring): `micro_batches` below, or a pipeline schedule (megatron, engine.pp > 1). Returns
        [(loss sum, stats)] in order, on every rank. `model`: a frozen model from `build_frozen` whose pipeline
        runs instead of the policy's (forward_only; `fn` calls it); without a pipeline `fn` just calls it."""

    def step(self) -> tuple[Optional[float], bool]:
        """Applies the accumulated gradients: (gradient norm before clipping, skipped as non-finite)."""

    @property
    def param_groups(self) -> list[dict]: ...

    def full_state_dict(self, rank: int = 0) -> Optional[dict]:
        """Full weights (CPU) on `rank`, None on the others; partitioned weights are gathered one at a time."""

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def build_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy placed like the trained model (reference models); returns what to call."""


def micro_batches(engine: Engine, micro: list[dict], fn, forward_only: bool = False, model=None) -> list[tuple]:
    """`Engine.forward_backward` one micro-batch after the other: forward, then backward (no pipeline)."""
    out = []
    for mb in micro:
        loss, loss_sum, stats = fn({k: v.to(engine.device) if isinstance(v, torch.Tensor) else v
                                    for k, v in mb.items()})
        if not forward_only:
            engine.backward(loss)
        out.append((loss_sum.detach(), stats))
    return out


def build(model: torch.nn.Module, groups: dict, stage: StageConfig, cfg: EngineConfig, micro_batch: int,
          grad_accum: int, world: int, max_steps: int, parallel: Optional[ParallelConfig] = None,
          tiled_mlp: int = 0) -> Engine:
    return _kind(cfg).Engine(model, groups, stage, cfg, micro_batch, grad_accum, world, max_steps,
                             parallel or ParallelConfig(), tiled_mlp)


def check(cfg: EngineConfig, micro_batch: int, grad_accum: int, world: int, grad_clip: float) -> None:
    """Engine settings that can never work, before any model is built (ValueError naming the key)."""
    _kind(cfg).check(cfg, micro_batch, grad_accum, world, grad_clip)


def init_distributed(cfg: Optional[EngineConfig] = None) -> None:
    _kind(cfg or EngineConfig()).init_distributed()


def checkpoint_weights(step_dir: Path) -> dict:
    """Full weights (HF names) of a training checkpoint directory of either engine (a next stage may start there)."""
    from training.engines import megatron

    if megatron.is_checkpoint(step_dir):
        return megatron.checkpoint_weights(step_dir)
    from training.engines import deepspeed

    return deepspeed.checkpoint_weights(step_dir)


def _kind(cfg: EngineConfig):
    if cfg.kind == "megatron":
        from training.engines import megatron

        return megatron
    if cfg.kind != "deepspeed":
        raise ValueError(f"engine.kind={cfg.kind!r} is unknown; choose deepspeed or megatron")
    from training.engines import deepspeed

    return deepspeed


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def optimizer_groups(model: torch.nn.Module, groups: dict[str, list[str]], stage: StageConfig) -> list[dict]:
    """One torch param group per (trainable leaf group, decay/no-decay); frozen groups are left out entirely.

    `groups` is training/models.py `param_groups` (leaf groups); stage.trainable may name top-level groups
    (`llm` on a MoE model: dense, router, experts), and each leaf's lr is the most specific stage.lr_mult entry
    (`lr_mult.experts` over `lr_mult.llm`). "group" is the name whose multiplier applies, so lr / lr_mult[group]
    is the base lr; groups at lr 0 go last, so the first group gives the loop a base lr to log."""
    from training.models import leaf_groups, lr_mult_of

    params = dict(model.named_parameters())
    out = []
    for g in leaf_groups(stage.trainable, groups):
        source, mult = lr_mult_of(g, stage.lr_mult)
        names = [n for n in groups[g] if params[n].requires_grad]
        for decay in (True, False):
            ps = [params[n] for n in names if _no_decay(n, params[n]) != decay]
            if ps:
                out.append({"params": ps, "name": f"{g}{'' if decay else '_no_decay'}", "group": source,
                            "lr": stage.optimizer.lr * mult,
                            "weight_decay": stage.optimizer.weight_decay if decay else 0.0})
    if not out:
        raise ValueError(f"stage {stage.name!r} trains no parameter (stage.trainable={stage.trainable})")
    return sorted(out, key=lambda g: g["lr"] == 0)  # stable: the order is unchanged unless some lr is 0


def lr_lambda(stage: StageConfig, max_steps: int):
    s = stage.schedule
    if s.kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"stage.schedule.kind={s.kind!r}; choose cosine, linear or constant")

    warmup = int(s.warmup_ratio * max_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if s.kind == "cosine" else 1 - frac
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return f


