"""Data parallelism of engine=megatron on megatron-core's DDP gradient buffers and (distributed) optimizer.

`DataParallel` takes over what the engine's `step` does by hand (one all-reduce per parameter, torch AdamW):

- megatron's `DistributedDataParallel` over exactly the parameters of the engine's optimizer groups (the ViT and
  merger, replicated over TP, are ordinary parameters there; frozen ones are left out). It keeps one contiguous
  gradient buffer per (param dtype, grad dtype) and, on each parameter's gradient accumulator, a backward hook that
  adds the gradient into `param.main_grad` (a view of the buffer) and sets `param.grad = None`: after a backward,
  **p.grad is None and the gradient is in p.main_grad**. With the distributed optimizer the parameters themselves
  become views of a parameter buffer too (`param.data` is re-pointed once, at construction, values kept): build
  `DataParallel` after the model is placed (device, dtype) and never replace `param.data` afterwards
  (`load_state_dict` copies in place and is fine). The wrapper is never called: the engine calls its module as
  before. DDP registers no forward hooks here (it does only with overlap_param_gather, which stays off).
  Gradients stay sums: megatron scales the buffers by 1/dp before reducing unless the TransformerConfig has
  `calculate_per_token_loss` (pipeline.py `build_chunks` sets it), which is therefore required. Do not set
  `config.finalize_model_grads_func`: megatron's schedules would then divide the gradients by the token count.
- `finish_grads()` after the step's backwards is megatron's `finalize_model_grads`: the DP reduction of the buffers
  (a reduce-scatter with the distributed optimizer, else an all-reduce; MoE experts, megatron's `allreduce=False`,
  over the expert-data-parallel group), then on `main_grad` the q/k-layernorm partial gradients (and, once sequence
  parallelism is on, every `sequence_parallel` weight) summed over TP, then a tied embedding's gradient summed with
  its head copy's over the embedding group (first and last pipeline stage). It replaces pipeline.py
  `finalize_grads`, which works on `.grad`. After a reduce-scatter only this DP rank's shard of each bucket holds
  reduced values; nothing but the optimizer should read `main_grad` then.
- `step(clip)`: megatron's optimizer pieces, in the engine's order: the gradients into the main parameters, the
  global norm (megatron's `get_grad_norm_fp32`: a TP-sharded weight counted on every TP rank, a replicated one on
  TP rank 0 only, a tied head copy (`param.shared`) not at all, summed over the optimizer's group: all ranks with
  the distributed optimizer (each DP rank norms its own shard), the model-parallel group without it (the expert
  tensor-model-pipeline group, EP included, for the experts)), a skipped step if it is not finite (returns
  (norm, True), parameters and optimizer state untouched), else clipping by that norm
  (`clip_grad_by_total_norm_fp32`: factor clip / (norm + 1e-6) when below 1, torch's clip_grads_with_norm_) and
  the update, and the parameter all-gather of the distributed optimizer. Then the buffers are zeroed.

Optimizers (`distributed=True`, the default): megatron's `DistributedOptimizer` (ZeRO-1: fp32 main parameters and
Adam moments only for this rank's 1/dp shard of every bucket) built directly on a torch AdamW over *our* parameter
groups, not through `get_megatron_optimizer` (which would build megatron's own groups): its constructor swaps each
group's parameters for this rank's shards and keeps the group dicts, so every key of training/engine.py
`optimizer_groups` ("name", "group", "lr", "weight_decay") survives in `param_groups`, and setting group["lr"]
each step (the engine's LR schedule) takes effect. bf16 parameters get fp32 main shards; fp32 parameters are
updated in place (their shards are views of the parameter buffer, no copies). `distributed=False`: the same DDP
buffers all-reduced, and megatron's `FP32Optimizer` (fp32 parameters: AdamW on the parameters, `p.grad` pointed at
`p.main_grad`) or `Float16OptimizerWithFloat16Params` (bf16: whole fp32 main copies). With MoE experts split over
EP (`allreduce=False`) there is a second optimizer of the same kind over the expert buffers (megatron's
get_megatron_optimizer does the same), and the norm is the root of both parts' squared norms.

Buckets: megatron 0.16 builds buckets of `bucket_size` elements only with `overlap_grad_reduce`; without it one
bucket per buffer. `bucket_size=None` is that single bucket; a number builds the buffers with overlap_grad_reduce
on (so the buckets exist) and turns it off right after, so every bucket is still reduced synchronously in
`finish_grads` (overlapping needs every parameter to get a gradient in every step's last micro-batch, which the
unused ViT copies on later pipeline stages do not). Megatron makes no buckets on pipeline stages after the first.
Tied embeddings across stages: like megatron's LanguageModule, both the first stage's embedding and the last
stage's copy are marked `shared_embedding` (each gets a bucket of its own, so both stages shard it alike and the
embedding all-reduce after the reduce-scatter adds matching shards) and the copy `shared` (out of the norm).
The engine's old `_grad_norm` keys the copy on `shared_embedding`: with DataParallel it is not used.

Checkpoints (`state_dict` / `load_state_dict`): this rank's part, plain tensors, numbers, strings, lists and dicts
(torch.load(weights_only=True)): per optimizer part the inner torch AdamW's state_dict (its parameters are this
rank's shards or main copies; the group dicts with our keys, the lr included) and the fp32 main parameters of
16-bit parameters (fp32 ones are the model's own weights, which the engine saves). Loading needs the same layout
(tp, pp, ep, world, distributed, the same groups); the model's weights must be loaded (in place) as well. Then
training continues bit-identically. Weights loaded without the optimizer state: `reload_model_params()`.

CPU (tests, CI): besides training/mcore/shim.py's `apply()` (torch.cuda.current_device -> "cpu"), megatron's
optimizers need `shim.on_cpu()`, which every call into them here runs under (a no-op where CUDA is available).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from training.mcore import shim

FORMAT = 1  # of state_dict()


class _Params(torch.nn.Module):
    """What megatron's DDP wraps: the parameters under their step-module names (empty modules along each dotted
    path, so that megatron's name rules, "q_layernorm" / "k_layernorm", see them), plus what finalize_model_grads
    asks of a model chunk (`pre_process`, `share_embeddings_and_output_weights`,
    `shared_embedding_or_output_weight()`, for the tied embedding's all-reduce over the embedding group)."""

    def __init__(self, named: list, chunks: list):
        super().__init__()
        for name, p in named:
            *path, leaf = name.split(".")
            m = self
            for part in path:
                if part not in m._modules:
                    m.add_module(part, torch.nn.Module())
                m = m._modules[part]
            m.register_parameter(leaf, p)
        self.__dict__["_chunks"] = list(chunks)
        self.pre_process = any(c.pre_process for c in chunks)
        self.share_embeddings_and_output_weights = bool(chunks) and bool(chunks[0].tied)

    def shared_embedding_or_output_weight(self):
        """The first stage's embedding, else the last stage's head (its copy when tied across stages)."""
        for c in self._chunks:
            if c.pre_process:
                return c.embedding.word_embeddings.weight
        for c in self._chunks:
            if c.post_process:
                return c.output_layer.weight
        return None


def _mark_tied(chunks: list) -> None:
    """megatron LanguageModule's attributes of an embedding tied across pipeline stages (module docstring)."""
    from megatron.core import parallel_state as ps

    if not chunks or not chunks[0].tied or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    for c in chunks:
        if c.pre_process:
            c.embedding.word_embeddings.weight.shared_embedding = True
        elif c.post_process:
            w = c.output_layer.weight
            w.shared_embedding = True
            w.shared = True


class DataParallel:
    """megatron DDP gradient buffers + (distributed) optimizer over this rank's trainable parameters (module
    docstring).

    module: the step module (parameter names); chunks: its Decoder chunks (pipeline.py `build_chunks`; [] for a
    module without one); groups: training/engine.py `optimizer_groups` dicts ("params", "lr", "weight_decay", and
    any other keys, kept); betas, eps: AdamW's; config: the Decoder's TransformerConfig (calculate_per_token_loss);
    distributed: megatron's DistributedOptimizer (else FP32Optimizer / Float16OptimizerWithFloat16Params);
    bucket_size: elements per DDP bucket (None: one bucket per buffer); grad_reduce_in_fp32: fp32 gradient buffers
    for 16-bit parameters (megatron's --accumulate-allreduce-grads-in-fp32; no effect on fp32 parameters).
    Call order per step: the backwards, `finish_grads()`, `step(clip)` (which zeroes the buffers)."""

    def __init__(self, module: torch.nn.Module, chunks, groups: list[dict], betas, eps: float, config,
                 distributed: bool = True, bucket_size: int | None = None, grad_reduce_in_fp32: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        if not config.calculate_per_token_loss:
            raise ValueError("DataParallel needs the TransformerConfig's calculate_per_token_loss=True: otherwise "
                             "megatron's DDP averages the gradients over data-parallel ranks (the engine's are sums)")
        shim.apply()
        names = {}
        for n, p in module.named_parameters():
            names.setdefault(p, n)
        named, seen = [], set()
        for g in groups:
            missing = {"params", "lr", "weight_decay"} - set(g)
            if missing:
                raise ValueError(f"parameter group {g.get('name')!r} lacks {sorted(missing)}")
            for p in g["params"]:
                if p not in names:
                    raise ValueError(f"group {g.get('name')!r} holds a parameter that is not the module's")
                if p in seen:
                    raise ValueError(f"parameter {names[p]} is in two groups")
                if not p.requires_grad:
                    raise ValueError(f"parameter {names[p]} (group {g.get('name')!r}) does not require grad")
                if p.dtype == torch.float16:
                    raise ValueError(f"parameter {names[p]} is float16, which needs a loss scaler: use fp32 or bf16")
                seen.add(p)
                named.append((names[p], p))
        self.distributed = distributed
        self.chunks = list(chunks)
        _mark_tied(self.chunks)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32,
                                                   overlap_grad_reduce=bucket_size is not None,
                                                   use_distributed_optimizer=distributed, bucket_size=bucket_size)
        with shim.on_cpu():
            self.ddp = DistributedDataParallel(config, ddp_config, _Params(named, self.chunks))
        ddp_config.overlap_grad_reduce = False  # the buckets are built; reduce them synchronously (module docstring)

        experts = [not getattr(p, "allreduce", True) for _, p in named]
        flags = torch.tensor([any(experts), -any(experts)], dtype=torch.int)  # (max, -min) over the ranks
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] != -flags[1]:
            raise ValueError("expert-parallel parameters (allreduce=False) are trainable on some ranks only")
        parts = [(False, self.ddp.buffers)] + ([(True, self.ddp.expert_parallel_buffers)] if any(experts) else [])
        self.optimizers = []  # megatron's, one per part: the dense parameters, the experts (allreduce=False)
        self.experts = [expert for expert, _ in parts]  # whether optimizers[i] is the experts'
        for expert, buffers in parts:
            sub = []
            for g in groups:
                ps_ = [p for p in g["params"] if (not getattr(p, "allreduce", True)) == expert]
                if ps_:
                    sub.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps_})
            self.optimizers.append(self._build(sub, betas, eps, config, expert, buffers))

    def _build(self, groups: list[dict], betas, eps: float, config, expert: bool, buffers):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import (DistributedOptimizer, Float16OptimizerWithFloat16Params,
                                             FP32Optimizer, OptimizerConfig)

        inner = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(betas), eps=eps)
        sixteen = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
        ocfg = OptimizerConfig(optimizer="adam", lr=groups[0]["lr"], weight_decay=0.0, adam_beta1=betas[0],
                               adam_beta2=betas[1], adam_eps=eps, clip_grad=0.0, bf16=sixteen,
                               params_dtype=config.params_dtype, use_distributed_optimizer=self.distributed)
        with shim.on_cpu():
            if self.distributed:
                dp = ps.get_expert_data_parallel_group(partial_expert_data_parallel=True) if expert else \
                    ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
                opt = DistributedOptimizer(inner, ocfg, None, None, model_chunks=[self.ddp],
                                           per_model_buffers={0: buffers}, data_parallel_group=dp,
                                           data_parallel_group_gloo=None,
                                           data_parallel_group_idx=ps.get_model_parallel_group().rank(),
                                           distributed_optimizer_instance_id=0)
                stats = ps.get_intra_distributed_optimizer_instance_group()  # every rank norms its own shards
            else:
                opt = Float16OptimizerWithFloat16Params(inner, ocfg, None, None) if sixteen else \
                    FP32Optimizer(inner, ocfg, None)
                stats = ps.get_expert_tensor_model_pipeline_parallel_group() if expert else \
                    ps.get_model_parallel_group()
        opt.grad_stats_parallel_group = stats
        opt.tp_group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        return opt

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer groups with our keys (the inner AdamWs' live dicts: read them anew after load_state_dict,
        which replaces them). With experts split over EP, a group's expert part is a dict of its own."""
        return [g for opt in self.optimizers for g in opt.optimizer.param_groups]

    def finish_grads(self) -> None:
        """After the step's backwards: megatron's finalize_model_grads (module docstring)."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])

    @torch.no_grad()
    def step(self, clip: float) -> tuple[float, bool]:
        """(the global gradient norm before clipping, skipped as non-finite); clips to `clip` (> 0) and updates
        unless skipped; then zeroes the gradient buffers either way."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        with shim.on_cpu():
            for opt in self.optimizers:
                opt.prepare_grads()  # main_grad (this rank's shards) -> the main parameters' .grad, fp32
            norm = math.sqrt(sum(float(opt.get_grad_norm()) ** 2 for opt in self.optimizers))
            skipped = not math.isfinite(norm)
            if not skipped:
                for opt in self.optimizers:
                    if clip > 0:
                        clip_grad_by_total_norm_fp32(opt.get_parameters(), clip, norm)
                    opt.step_with_ready_grads()  # AdamW on the main parameters, copy back, all-gather
        self.zero_grad()
        return norm, skipped

    def zero_grad(self) -> None:
        """Zeroes the gradient buffers (and drops the main parameters' .grad)."""
        self.ddp.zero_grad_buffer()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def reload_model_params(self) -> None:
        """After the model's weights changed outside the optimizer (loaded without its state): the fp32 main
        parameters of 16-bit ones copied from them again (megatron's reload_model_params; fp32 ones are the
        weights themselves)."""
        with shim.on_cpu():
            for opt in self.optimizers:
                opt.reload_model_params()

    @staticmethod
    def _main_params(opt) -> list[list[torch.Tensor]]:
        """The fp32 main copies of 16-bit parameters (this rank's shards with the distributed optimizer)."""
        return [list(g) for g in getattr(opt, "shard_fp32_from_float16_groups", None)
                or getattr(opt, "fp32_from_float16_groups", None) or []]

    def state_dict(self) -> dict:
        """This rank's optimizer state (module docstring); tensors are live references, as torch's."""
        return {"format": FORMAT, "distributed": self.distributed,
                "parts": [{"optimizer": opt.optimizer.state_dict(),
                           "main_params": [[t.detach() for t in g] for g in self._main_params(opt)]}
                          for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT or state.get("distributed") != self.distributed \
                or len(state.get("parts", ())) != len(self.optimizers):
            raise ValueError(f"optimizer state of format {state.get('format')}, distributed="
                             f"{state.get('distributed')}, {len(state.get('parts', ()))} part(s) does not fit this "
                             f"one (format {FORMAT}, distributed={self.distributed}, {len(self.optimizers)} part(s))")
        for opt, part in zip(self.optimizers, state["parts"]):
            mine = self._main_params(opt)
            params = [p for g in opt.optimizer.param_groups for p in g["params"]]
            saved = part["optimizer"]
            ids = [i for g in saved["param_groups"] for i in g["params"]]
            if [[tuple(t.shape) for t in g] for g in mine] != [[tuple(t.shape) for t in g]
                                                               for g in part["main_params"]] \
                    or len(ids) != len(params) or any(tuple(saved["state"][i]["exp_avg"].shape) != tuple(p.shape)
                                                      for i, p in zip(ids, params) if i in saved["state"]):
                raise ValueError("the saved optimizer state does not fit this layout's parameter shards (a resume "
                                 "needs the same tp, pp, ep, world, groups and bucket size)")
            opt.optimizer.load_state_dict(part["optimizer"])
            with torch.no_grad():
                for g, saved in zip(mine, part["main_params"]):
                    for t, s in zip(g, saved):
                        t.copy_(s)
