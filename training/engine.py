"""DeepSpeed adapter: the DeepSpeed config is generated from the `engine=` group; raw keys pass through.

Optimizer and LR schedule are built here (client-side) so that parameter groups carry the stage's
per-group learning-rate multipliers and only trainable parameters get optimizer state.

CPU offload (`engine.offload_optimizer`, ZeRO 1-3; `engine.offload_params`, ZeRO-3): on a GPU the optimizer
that steps the offloaded fp32 state is DeepSpeedCPUAdam (AVX, many threads; DeepSpeed's own choice). With
DS_ACCELERATOR=cpu the parameters and the optimizer state live in host memory anyway, so offloading moves
nothing: torch's AdamW stays (the same optimizer as without offload, and no 2-minute JIT build of the
cpu_adam op) and DeepSpeed's "client optimizer with offload" refusal is switched off
(`zero_force_ds_cpu_optimizer: false`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from stages import StageConfig

log = logging.getLogger("training")


@dataclass
class EngineConfig:
    name: str = "zero2"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    dtype: str = "fp32"  # fp32 | bf16
    raw: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: EngineConfig, micro_batch: int, grad_accum: int, world: int, grad_clip: float) -> dict:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={cfg.zero_stage}; choose 0, 1, 2 or 3")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ValueError(f"engine.dtype={cfg.dtype!r}; choose fp32 or bf16")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError("engine.offload_params=true needs engine.zero_stage=3 (use engine=zero3)")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise ValueError("engine.offload_optimizer=true needs ZeRO (engine.zero_stage 1, 2 or 3): without ZeRO "
                         "DeepSpeed ignores it; use engine=zero2 or engine=zero3")
    check_batch_geometry(cfg.raw, micro_batch, grad_accum, world)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # our own metrics replace DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    if (cfg.offload_optimizer or cfg.offload_params) and not use_ds_cpu_adam(cfg):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on host memory is right here (module docstring)
    return _merge(ds, cfg.raw)


# DeepSpeed's batch keys; the trainer's micro-batch loop and data layout follow trainer.*, so raw copies of
# them may only repeat what trainer.* and the world size already say
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_batch_geometry(raw: dict, micro_batch: int, grad_accum: int, world: int) -> None:
    """engine.raw may not set a batch geometry that differs from trainer.* (DeepSpeed would step at other
    boundaries than the loop's micro-batches, or assert after the model is built)."""
    want = {"train_batch_size": micro_batch * grad_accum * world, "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum}
    for key in _BATCH_KEYS:
        if key not in raw or raw[key] in (None, "auto") or int(raw[key]) == want[key]:
            continue
        got = int(raw[key])
        if key == "train_batch_size":
            per_step = micro_batch * world
            fix = (f"set trainer.grad_accum={got // per_step} instead" if got % per_step == 0 and got > 0 else
                   f"it must be a multiple of trainer.micro_batch_size x world size = {per_step}; set "
                   f"trainer.grad_accum (and trainer.micro_batch_size) instead")
            raise ValueError(f"engine.raw.train_batch_size={got} but trainer.micro_batch_size ({micro_batch}) x "
                             f"trainer.grad_accum ({grad_accum}) x world size ({world}) = {want[key]}; {fix}, and "
                             f"leave the batch keys out of engine.raw")
        name = "trainer.micro_batch_size" if key == "train_micro_batch_size_per_gpu" else "trainer.grad_accum"
        raise ValueError(f"engine.raw.{key}={got} contradicts {name}={want[key]}; set {name}={got} instead and "
                         f"leave the batch keys out of engine.raw")


def use_ds_cpu_adam(cfg: EngineConfig) -> bool:
    """DeepSpeedCPUAdam steps offloaded optimizer state when the model runs on an accelerator; on the CPU
    accelerator there is nothing to offload from and torch's AdamW (the non-offloaded optimizer) is kept."""
    if not (cfg.offload_optimizer or cfg.offload_params):
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def optimizer_groups(model: torch.nn.Module, groups: dict[str, list[str]], stage: StageConfig) -> list[dict]:
    """One torch param group per (trainable group, decay/no-decay); frozen groups are left out entirely."""
    params = dict(model.named_parameters())
    out = []
    for g in stage.trainable:
        mult = float(stage.lr_mult.get(g, 1.0))
        names = [n for n in groups[g] if params[n].requires_grad]
        for decay in (True, False):
            ps = [params[n] for n in names if _no_decay(n, params[n]) != decay]
            if ps:
                out.append({"params": ps, "name": f"{g}{'' if decay else '_no_decay'}", "group": g,
                            "lr": stage.optimizer.lr * mult,
                            "weight_decay": stage.optimizer.weight_decay if decay else 0.0})
    if not out:
        raise ValueError(f"stage {stage.name!r} trains no parameter (stage.trainable={stage.trainable})")
    return out


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


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW for DeepSpeed without ZeRO in fp32, where DeepSpeed's step clips but neither reports the
    gradient norm nor skips a non-finite step (a NaN would reach every weight); ZeRO's optimizers and the bf16
    one do both. This one does them the same way: the global norm of the (already all-reduced) gradients before
    clipping is `_global_grad_norm`; a non-finite norm sets `overflow`, so the update is skipped and DeepSpeed
    counts the step in `skipped_steps` and leaves the lr schedule alone; else the gradients are clipped to
    `max_norm` (0: no clipping) and AdamW steps."""

    def __init__(self, params, max_norm: float, **kw):
        super().__init__(params, **kw)
        self.max_norm, self.overflow, self._global_grad_norm = float(max_norm), False, None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


def for_world(cfg: EngineConfig, world: int) -> EngineConfig:
    """The engine config to run with `world` data-parallel ranks.

    ZeRO-1/2 partition optimizer state and gradients over the ranks. With one rank they partition nothing and
    still cost a flat fp32 copy of every trainable weight and a gradient copy per backward (15% of the tiny
    model's step on CPU, training/bench.py), so a one-rank run of a ZeRO-1/2 recipe runs as stage 0: the same
    AdamW update and clipping within float32 round-off (the gradient norm is summed in another order), and
    GuardedAdamW keeps the grad-norm metric and the non-finite skip. Optimizer offload needs ZeRO and keeps it.
    ZeRO-3 is kept, so that a one-GPU debug run of a ZeRO-3 recipe exercises the real parameter gathering."""
    if world == 1 and cfg.zero_stage in (1, 2) and not cfg.offload_optimizer:
        log.info("engine %s with one rank: ZeRO-%d partitions nothing there; running DeepSpeed without ZeRO "
                 "(stage 0)", cfg.name, cfg.zero_stage)
        return dataclasses.replace(cfg, zero_stage=0)
    return cfg


def initialize(model, groups, stage: StageConfig, cfg: EngineConfig, micro_batch: int, grad_accum: int,
               world: int, max_steps: int):
    import deepspeed

    cfg = for_world(cfg, world)

    param_groups = optimizer_groups(model, groups, stage)
    kw = dict(lr=stage.optimizer.lr, betas=tuple(stage.optimizer.betas), eps=stage.optimizer.eps)
    grad_clip = stage.optimizer.grad_clip
    if use_ds_cpu_adam(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kw)  # decoupled decay, per group as in AdamW
    elif cfg.zero_stage == 0 and cfg.dtype == "fp32":
        opt, grad_clip = GuardedAdamW(param_groups, max_norm=grad_clip, **kw), 0.0  # it clips, not DeepSpeed
    else:
        opt = torch.optim.AdamW(param_groups, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, max_steps))
    ds_cfg = deepspeed_config(cfg, micro_batch, grad_accum, world, grad_clip)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                           config=ds_cfg)
    if world == 1 and cfg.zero_stage == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank: flattening and copying, no change
    return engine, ds_cfg
