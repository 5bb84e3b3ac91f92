"""Running megatron-core 0.16 on a CPU-only machine (tests, CI), and its model-parallel state on any machine.

megatron-core assumes CUDA in a few places that the local (non-Transformer-Engine) spec still reaches on CPU.
`apply()` redirects exactly these, and only when `torch.cuda.is_available()` is false (idempotent):

- `torch.cuda.current_device` -> returns "cpu". megatron-core allocates with `device=torch.cuda.current_device()`
  (e.g. the global memory buffer the local DotProductAttention takes its score matrix from, and the inv_freq of
  `MultimodalRotaryEmbedding`); on a CPU-only torch the call raises. This is the one patch of torch itself: code
  that calls it on a CPU machine would otherwise raise "Torch not compiled with CUDA enabled".
- `megatron.core.tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> `torch.get_rng_state` /
  `torch.set_rng_state`. The local DotProductAttention runs its (attention-)dropout inside
  `get_cuda_rng_tracker().fork()`, which swaps the CUDA generator's state; on CPU the tracker holds CPU generator
  states instead, so fork() swaps the CPU generator's state in and restores it on exit (dropout is 0 for these
  models; the swap leaves the CPU RNG stream of the caller as it was; with a nonzero attention dropout megatron
  logs "CPU RNG state changed within GPU RNG context" on every call, since on CPU both are one generator).
  These are megatron's own module functions, not torch.cuda's: `torch.cuda.manual_seed` / `get_rng_state` /
  `set_rng_state` are left alone, and megatron's `model_parallel_cuda_manual_seed` (which calls them) is
  replaced by `manual_seed` below.
- MoE (training/mcore/moe.py), megatron's alltoall token dispatcher `MoEAlltoAllTokenDispatcher`: its __init__
  creates a `torch.cuda.Stream()` (class attribute `cuda_dtoh_stream`, made when None), and
  `_maybe_dtoh_and_synchronize` copies the token counts to the host on that stream (`torch.cuda.current_stream()`,
  `torch.cuda.stream(...)`, `record_event()`, `event.synchronize()`); each raises on a CPU-only torch. The class
  attribute gets a placeholder (no stream is made) and the method a CPU version doing what the copies amount to
  there: the all-to-all split sizes become numpy arrays as the CUDA path's `as_numpy` copies make them
  (torch's `all_to_all_single` binding takes sequences of ints and rejects a tensor); the other counts
  already are CPU tensors. gloo runs the uneven `all_to_all_single` on CPU tensors itself.

Pipeline schedules (training/mcore/pipeline.py): `cuda_factories_on_cpu()`, a context manager (not a patch: active
only around the schedule call, and only without CUDA) that turns a `device="cuda"` argument of a torch call into
"cpu". megatron's `forward_backward_no_pipelining` / `_pipelining_without_interleaving` / `_with_interleaving`
count tokens in `torch.zeros([], dtype=torch.int, device="cuda")`, a literal device string that patching
`torch.cuda.current_device` cannot reach. Their p2p buffers are allocated on `torch.cuda.current_device()`
(patched above). The `torch.cuda.synchronize()` after `batch_isend_irecv` (p2p_communication.py) is not
reached: on CPU model.py `transformer_config` sets `batch_p2p_comm=False` (megatron's unbatched isend/irecv,
which gloo needs at pp=2 anyway: see there).

Optimizers (training/mcore/optim.py): `on_cpu()`, a context manager like the one above around every call into
megatron's optimizers: besides the device="cuda" arguments, a CPU tensor's `Tensor.type()` reads as the CUDA type
name (megatron sorts parameters by it); see its docstring.

Not redirected because nothing on our path needs it: the local spec's default causal mask (built with
device="cuda"; `Decoder` always passes an explicit mask), megatron's activation recompute (`CheckpointFunction`
saves torch.cuda RNG states; not used), and the fused kernels (off in `transformer_config`).
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

_applied = False


def apply() -> None:
    """Redirects megatron-core's CUDA-only calls to the CPU (see the module docstring); no-op on CUDA machines."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random

    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    torch.cuda.current_device = _cpu_device
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no CUDA stream on CPU (training/mcore/shim.py)"
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_counts_on_cpu
    _applied = True


def _host_counts_on_cpu(self, point: str, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA (module docstring)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            if torch.is_tensor(getattr(self, name)):
                setattr(self, name, getattr(self, name).numpy())
    return tokens_per_expert


class _CudaFactoriesOnCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_factories_on_cpu():
    """Context: torch calls given device="cuda" allocate on the CPU (see the module docstring); a no-op context
    where CUDA is available."""
    return nullcontext() if torch.cuda.is_available() else _CudaFactoriesOnCpu()


def _cpu_device() -> str:
    return "cpu"


def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def manual_seed(seed: int) -> None:
    """megatron's `model_parallel_cuda_manual_seed` (same seeds: data-parallel `seed`, tensor-parallel
    `seed + 2718 + tp_rank`, expert `seed + 1024 + 100 * ep_rank + etp_rank`) on CUDA; on CPU the tracker's states
    are CPU generator states made without touching torch.cuda, and the default generator is seeded with `seed`."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random

    if torch.cuda.is_available():
        random.model_parallel_cuda_manual_seed(seed)
        return
    apply()
    seeds = {random._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
             random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + ps.get_tensor_model_parallel_rank(),
             random._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
             + ps.get_expert_tensor_parallel_rank()}
    tracker = random.get_cuda_rng_tracker()
    tracker.reset()
    for name, s in seeds.items():
        tracker.states_[name] = torch.Generator().manual_seed(s).get_state()
        tracker.seeds_.add(s)
    tracker._is_initialized = True
    torch.manual_seed(seed)


def init_model_parallel(tp: int = 1, seed: int = 0, ep: int = 1) -> bool:
    """megatron's parallel state for tensor-parallel size `tp` (pipeline 1, data = world / tp) and expert-parallel
    size `ep` (EP ranks are data-parallel ranks; expert tensor parallelism = tp, 1 for the MoE decoder) on the
    existing torch.distributed group, or on a new single-process gloo group (FileStore: no port to collide on) when
    there is none; then `manual_seed(seed)`. Returns whether it created the process group (pass that to `destroy`)."""
    from megatron.core import parallel_state as ps

    apply()
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(tempfile.mkdtemp(prefix="mcore_") + "/store", 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    if dist.get_world_size() % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the {dist.get_world_size()} processes")
    ps.destroy_model_parallel()  # another caller's state in this process (tests): rebuilt for this tp
    if dist.get_world_size() % (tp * ep):
        raise ValueError(f"tensor x expert-parallel size {tp} x {ep} does not divide the {dist.get_world_size()} "
                         f"processes")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                 expert_model_parallel_size=ep)
    manual_seed(seed)
    return created


def destroy(created_group: bool) -> None:
    """Undoes `init_model_parallel`: megatron's groups, and the process group if it made it."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()


class _CudaTensorTypesOnCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextmanager
def on_cpu():
    """Context in which megatron-core 0.16's optimizers run on a CPU-only machine (a no-op where CUDA is available;
    training/engines/megatron.py's optimizer, training/mcore/optim.py). It redirects exactly:

    - `Tensor.type()` called without arguments on a CPU tensor -> the CUDA type name ("torch.FloatTensor" ->
      "torch.cuda.FloatTensor", "torch.BFloat16Tensor" -> "torch.cuda.BFloat16Tensor"). megatron's
      DistributedOptimizer / Float16OptimizerWithFloat16Params sort parameters into fp32 and 16-bit ones by these
      names (and raise TypeError on any other), and `clip_grad_by_total_norm_fp32` asserts
      `grad.type() == 'torch.cuda.FloatTensor'`. `type(dtype)` conversions and CUDA tensors are left alone.
    - a `device="cuda"` argument of a torch call -> "cpu" (cuda_factories_on_cpu): MixedPrecisionOptimizer's
      and FP32Optimizer's constant tensors (`_scale_one`, `_dummy_overflow_buf`, `_scale`), `get_grad_norm_fp32`'s
      and `clip_grad_by_total_norm_fp32`'s scratch tensors, `local_multi_tensor_l2_norm`'s result (the Apex/TE-free
      fallback megatron uses here).

    Both are torch function modes, active only inside the context. The DDP buffers are allocated on
    `torch.cuda.current_device()`, which apply() redirects (DataParallel calls it)."""
    if torch.cuda.is_available():
        yield
        return
    with cuda_factories_on_cpu(), _CudaTensorTypesOnCpu():
        yield
