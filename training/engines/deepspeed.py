"""The DeepSpeed engine (ZeRO 0-3): the one module that imports deepspeed, with its checkpoint glue.

The DeepSpeed config is generated from the `engine=` group; raw keys pass through (`engine.raw`). The optimizer
and LR schedule are built client-side (training/engine.py's parameter groups), so per-group learning rates
survive and only trainable parameters get optimizer state. DeepSpeed wraps the step module (training/vlm.py
VLM), so ZeRO-3's start-of-forward hook and per-module parameter gathering see the whole step.

CPU offload (`engine.offload_optimizer`, ZeRO 1-3; `engine.offload_params`, ZeRO-3): on a GPU the optimizer
that steps the offloaded fp32 state is DeepSpeedCPUAdam (AVX, many threads; DeepSpeed's own choice). With
DS_ACCELERATOR=cpu the parameters and the optimizer state live in host memory anyway, so offloading moves
nothing: torch's AdamW stays (the same optimizer as without offload, and no 2-minute JIT build of the
cpu_adam op) and DeepSpeed's "client optimizer with offload" refusal is switched off
(`zero_force_ds_cpu_optimizer: false`).

Checkpoints: DeepSpeed's .pt shards are read with torch.load(weights_only=True) and an allow-list of the few
DeepSpeed classes they contain (its checkpoint engine's load is replaced), so resuming never runs arbitrary
pickle code; `checkpoint_weights` consolidates a checkpoint's weights for the next stage the same way.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from stages import StageConfig
from training import sp
from training.engine import EngineConfig, lr_lambda, micro_batches, optimizer_groups
from training.moe import sparse_blocks
from training.parallel import ParallelConfig

log = logging.getLogger("training")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def init_distributed() -> None:
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def check(cfg: EngineConfig, micro_batch: int, grad_accum: int, world: int, grad_clip: float) -> None:
    if cfg.tp != 1 or cfg.pp != 1 or cfg.ep != 1 or cfg.vpp != 1 or cfg.sequence_parallel:  # megatron's keys
        raise ValueError(f"engine.tp={cfg.tp}, engine.pp={cfg.pp}, engine.vpp={cfg.vpp}, engine.ep={cfg.ep}: tensor, "
                         f"pipeline and expert "
                         f"parallelism are engine=megatron's; "
                         f"DeepSpeed shards with ZeRO (engine.zero_stage) and sequence-parallelises (parallel.sp_size)")
    deepspeed_config(cfg, micro_batch, grad_accum, world, grad_clip)


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


def _optimizer(param_groups: list, stage: StageConfig, cfg: EngineConfig):
    """(optimizer, the clipping DeepSpeed should do): GuardedAdamW clips itself."""
    kw = dict(lr=stage.optimizer.lr, betas=tuple(stage.optimizer.betas), eps=stage.optimizer.eps)
    if use_ds_cpu_adam(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kw), stage.optimizer.grad_clip  # decoupled decay
    if cfg.zero_stage == 0 and cfg.dtype == "fp32":
        return GuardedAdamW(param_groups, max_norm=stage.optimizer.grad_clip, **kw), 0.0
    return torch.optim.AdamW(param_groups, **kw), stage.optimizer.grad_clip


class Engine:
    """training.engine.Engine on DeepSpeed. Every DeepSpeed call of the loop, checkpoints and export is here."""

    def __init__(self, model: torch.nn.Module, groups: dict, stage: StageConfig, cfg: EngineConfig, micro_batch: int,
                 grad_accum: int, world: int, max_steps: int, parallel: ParallelConfig = ParallelConfig(),
                 tiled_mlp: int = 0):
        import deepspeed

        self.parallel, self.tiled_mlp = parallel, tiled_mlp
        self.sp_size = parallel.sp_size
        self._long_context(model)
        self.cfg = cfg = for_world(cfg, world)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        opt, grad_clip = _optimizer(optimizer_groups(model, groups, stage), stage, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, max_steps))
        self.ds_config = deepspeed_config(cfg, micro_batch, grad_accum, world, grad_clip)
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config)
        if world == 1 and cfg.zero_stage == 0:
            self.ds.enable_backward_allreduce = False  # an all-reduce over one rank: flattening and copying
        self.model, self.device = model, self.ds.device
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.world, self.dp_size, self.dp_rank, self.sp_rank = world, world // self.sp_size, *divmod(rank, self.sp_size)
        self.replica_rank = self.sp_rank
        # gradients are reduced over every process (DeepSpeed's data-parallel group is the world; an SP group's
        # ranks hold parts of one gradient), so ZeRO also partitions over every process
        self.groups = {"dp": None, "sp": self.sp_group}
        if self.sp_size > 1:
            log.info("sequence parallelism: %d SP groups of %d consecutive ranks (data-parallel size %d), Ulysses "
                     "attention, ViT %s; this rank: dp %d, sp %d", self.dp_size, self.sp_size, self.dp_size,
                     parallel.sp_vision, self.dp_rank, self.sp_rank)
        self.partitioned = bool(self.ds.zero_optimization_partition_weights())
        if self.partitioned and world > 1:
            model.sync_group = dist.group.WORLD  # lm_head chunks are collectives (training/vlm.py)

    def __call__(self, batch: dict, **kw):
        return self.ds(batch, **kw)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed averages gradients over all processes: scaled by their count, the reduced gradient is the sum of
        the ranks' shares (an SP group's ranks each hold the gradient of their slice of the one loss). DeepSpeed's own step() runs after every micro-batch but the last (it only counts)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss * self.world, scale_wrt_gas=False)
        if not boundary:
            self.ds.step()

    def forward_backward(self, micro: list[dict], fn, forward_only: bool = False, model=None) -> list[tuple]:
        return micro_batches(self, micro, fn, forward_only)

    def step(self) -> tuple[Optional[float], bool]:
        before = self.ds.skipped_steps
        self.ds.step()
        skipped = self.ds.skipped_steps > before
        norm = self.ds.get_global_grad_norm()
        return (None if norm is None else float(norm)), skipped

    @property
    def param_groups(self) -> list[dict]:
        return self.ds.optimizer.param_groups

    def full_state_dict(self, rank: int = 0) -> Optional[dict]:
        """Full weights on `rank` only. ZeRO-3 parameters are gathered one at a time (each rank holds at most one
        whole parameter beyond its shard); the other engines hold them whole already."""
        me = dist.get_rank() if dist.is_initialized() else 0
        state = self.model.state_dict(keep_vars=True)
        if not self.partitioned:
            return {k: v.detach().cpu().clone() for k, v in state.items()} if me == rank else None
        import deepspeed

        out, done = {}, {}
        for k, v in state.items():
            if id(v) not in done:
                gather = deepspeed.zero.GatheredParameters([v], modifier_rank=None) if hasattr(v, "ds_id") \
                    else nullcontext()
                with gather:
                    done[id(v)] = v.detach().cpu().clone() if me == rank else None
            out[k] = done[id(v)]
        return out if me == rank else None

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)

    def load(self, path: Path) -> None:
        self.ds.checkpoint_engine.load = _weights_only_load
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")

    def build_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Frozen, in eval mode; under ZeRO-3 partitioned like the policy (a DeepSpeed engine with no optimizer),
        else a plain module on the policy's device and dtype."""
        import deepspeed

        model.requires_grad_(False)
        model.eval()
        self._long_context(model)
        if self.partitioned:
            cfg = dataclasses.replace(copy.deepcopy(self.cfg), offload_optimizer=False)
            ds_cfg = deepspeed_config(cfg, self.micro_batch, self.grad_accum, self.world, 0.0)
            frozen, *_ = deepspeed.initialize(model=model, config=ds_cfg)
            frozen.eval()
            if self.world > 1:
                model.sync_group = dist.group.WORLD
            return frozen.module
        dtype = next(p.dtype for p in self.model.parameters())
        return model.to(device=self.device, dtype=dtype)


    def _long_context(self, model: torch.nn.Module) -> None:
        """DeepSpeed's long-sequence blocks on a step module: Ulysses attention over the SP group, TiledMLP. And a
        MoE model's sparse blocks as ZeRO-3 leaf modules: their parameters are gathered whole when the block runs,
        not per expert module as it is called, so ranks that route to different experts (or hit none) still make
        the same all-gathers (DeepSpeed #7461)."""
        blocks = sparse_blocks(model)
        if blocks:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, list(blocks))
        self.sp_group = sequence_parallel(model, self.sp_size, self.parallel.sp_vision) if self.sp_size > 1 else None
        if self.tiled_mlp > 1:
            for layer in model.model.language_model.layers:
                layer.mlp.forward = _tiled(layer.mlp, self.tiled_mlp)


def sequence_parallel(model: torch.nn.Module, sp_size: int, vision: str = "split"):
    """Makes the step module `model` (training/vlm.py VLM) an SP-group member: DeepSpeed's SP process groups
    (`sp_size` consecutive ranks) and its Ulysses all-to-all around the decoder's attention; training/sp.py does
    the VLM's part (row slices, the ViT share, per-token outputs). Returns this rank's SP group."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:  # once per process
        parallel_state_sp.initialize_sequence_parallel(sp_size)
    elif parallel_state_sp.get_sequence_parallel_world_size() != sp_size:
        raise ValueError(f"this process already has SP groups of size "
                         f"{parallel_state_sp.get_sequence_parallel_world_size()}, not {sp_size}")
    group = parallel_state_sp.get_sequence_parallel_group()
    text = model.config.get_text_config()
    sp.route_attention(text._attn_implementation)
    attention = UlyssesSPAttentionHF(
        attn=sp.plain_attention(text._attn_implementation), batch_size=1, attn_head_count=text.num_attention_heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers, process_group=group,
        seq_length_is_variable=True)
    sp.enable(model, group, vision, attention)
    return group


def _tiled(mlp: torch.nn.Module, shards: int):
    """mlp's forward in `shards` sequence pieces (DeepSpeed TiledMLP: the intermediate activations of one piece at
    a time, recomputed in backward)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    forward = type(mlp).forward
    params = [p for p in mlp.parameters()]
    return lambda x: TiledMLP.apply(lambda m, h: forward(m, h), mlp, x, shards, params)


# -- checkpoint glue -------------------------------------------------------------------------------------------
def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _weights_only_load(path: str, map_location=None):
    """Replaces DeepSpeed's checkpoint-engine load, which would unpickle arbitrary objects."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_weights(step_dir: Path) -> dict:
    """Full weights of a DeepSpeed checkpoint (ZeRO-1/2: the saved module; ZeRO-3: its shards consolidated),
    read with torch.load(weights_only=True) only."""
    states = step_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():  # ZeRO-3 names rank 0's file after its partition
        states = step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    module = _weights_only_load(str(states))["module"]
    if module and all(v.numel() > 0 for v in module.values()):
        return module
    from deepspeed.utils import zero_to_fp32

    real = torch.load  # zero_to_fp32 unpickles; make its loads weights-only for the duration

    def safe_load(f, map_location=None, **kw):
        with torch.serialization.safe_globals(_safe_globals()):
            return real(f, map_location=map_location, weights_only=True)

    torch.load = safe_load
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    finally:
        torch.load = real
