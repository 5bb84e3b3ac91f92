"""The megatron-core engine (`engine=megatron`): the language model tensor-, pipeline- and expert-parallel on
megatron-core, the rest as is.

The step module stays training/vlm.py's VLM, so the model step (ViT -> merge -> decoder -> chunked loss) and every
objective are the DeepSpeed engine's. What changes is inside it:

- `model.language_model` (HF's text decoder) is replaced by `_LanguageModel`, which takes HF's call (inputs_embeds,
  M-RoPE ids, cu_seq_lens_q or a padding mask, DeepStack features) and runs training/mcore/model.py's `Decoder`:
  megatron-core's TransformerLayers, this rank's `engine.tp` shard of every attention and MLP matrix and of the
  vocabulary-parallel embedding. Its weights come from the HF model through training/mcore/convert.py.
- `lm_head` becomes `_Head`: this rank's vocabulary shard of the logits, all-gathered to the whole vocabulary
  (padding columns cut), so the chunked loss sees ordinary [chunk, V] logits. Its calls are collectives over the
  TP group, which `VLM.sync_group` says (the chunk count is agreed on and each chunk recomputed in backward, as
  under ZeRO-3). The lm objective's cross-entropy skips the gather: `_Head.fused_nll` is Megatron's
  vocabulary-parallel cross-entropy, chunked, with its gradient taken in the forward (training/mcore/loss.py).
- The ViT and merger are HF modules, replicated over the TP group: every TP rank encodes the same images, and gets
  the same (whole) gradients, because the decoder's first column-parallel layers all-reduce their input gradient.

Pipeline parallelism (`engine.pp` > 1; training/mcore/pipeline.py): each rank holds its stage's layers (the
first stage also the embedding, the last the final norm and head). `forward_backward` runs megatron's 1F1B schedule
over the step's micro-batches: on the first stage the step's first half (ViT, merge, `VLM.decoder_output`), on
the last the objective's `loss_sum` with `VLM.pipeline_input` set (the decoder's input is the received tensor).
With `engine.vpp` > 1 a rank holds vpp chunks (megatron's interleaved 1F1B: rank r's chunk v is global stage
v x pp + r); the schedule says which chunk each call runs, and only the first rank's first chunk runs the ViT;
Qwen3-VL's DeepStack features ride with the hidden states to the stages whose layers take them. The last stage's
loss sums and metrics are broadcast to the other stages, so the loop sees what it sees without a pipeline. Only
objectives whose loss is one policy call run there (`Objective.no_pipeline`): the lm stages; DPO, whose frozen
reference runs a forward-only schedule of its own first (`Objective.frozen_pass`, `model=`); SAPO, whose rollouts
every stage generates with the gathered whole decoder (the first stage's taken), whose rollout-policy and
reference log-probs are forward-only schedules, and whose padded rollout rows train one schedule per shape;
distillation, whose teacher's hidden states come from its own forward-only schedule and stay on the last stage.

MoE models (Qwen3-VL MoE; tp 1, pp 1): every sparse layer is megatron's MoE layer (training/mcore/moe.py), its
experts split over `engine.ep` consecutive data-parallel ranks, the tokens dispatched all-to-all to the rank that
holds their experts. An expert's gradient is summed over the ranks holding the same experts (megatron's
expert-data-parallel group), the rest over the data-parallel group; the gradient norm sums the experts' part over
the EP group. The routers' outputs go through a tap that training/moe.py hooks as it hooks HF's routers.

Data parallelism is over megatron's data-parallel group (world / (tp x pp) ranks; rank order tp-pp-dp, so a
replica's TP and pipeline ranks are consecutive and read the same rows): gradients are summed over that group
only, after the q/k-norm partial gradients are summed over TP and a tied embedding's gradient with its head copy
on the last stage: megatron's DDP gradient buffers and finalize_model_grads (training/mcore/optim.py). The
optimizer is megatron's distributed optimizer (`engine.distributed_optimizer`, default: ZeRO-1, the Adam moments
and bf16's fp32 main weights sharded over the data-parallel ranks; false: megatron's unsharded one) on a torch
AdamW over our parameter groups (the same groups and LR schedule as DeepSpeed's, training/engine.py). The
gradient norm counts a TP-sharded weight once over its shards, a replicated one once, sums the stages, and skips
the tied copy. The ViT's copies on later stages get no gradients (unused there; the export takes the first
stage's). TP sequence parallelism: `engine.sequence_parallel` (training/mcore/model.py).

Checkpoints: one file per rank, `mcore_rank<r>.pt` (this rank's weights, optimizer and scheduler state, the layout
that wrote it), loaded with torch.load(weights_only=True); a resume with another tp, pp or world is refused naming
what changed. `full_state_dict` gathers the TP shards and the stages and converts them back to HF names, so `hf/`
is a plain HF export; `checkpoint_weights` does the same from a checkpoint directory (a next stage may start from
one, at any tp and pp).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages import StageConfig
from training.engine import EngineConfig, lr_lambda, micro_batches, optimizer_groups
from training.parallel import ParallelConfig

log = logging.getLogger("training")
LM_PREFIXES = ("model.language_model.", "lm_head.")  # the HF modules the megatron decoder replaces
DECODER = "model.language_model.decoder."  # the (first) Decoder's keys in the step module's state dict
VIRTUAL = "model.language_model.virtual_stages."  # engine.vpp > 1: this rank's later virtual stages, numbered from 0


def init_distributed() -> None:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def check(cfg: EngineConfig, micro_batch: int, grad_accum: int, world: int, grad_clip: float) -> None:
    if cfg.sequence_parallel and cfg.tp == 1:
        raise ValueError("engine.sequence_parallel=true splits the activations over the tensor-parallel ranks; it needs "
                         "engine.tp > 1")
    if cfg.vpp < 1 or (cfg.vpp > 1 and cfg.pp == 1):
        raise ValueError(f"engine.vpp={cfg.vpp}: virtual pipeline stages per rank need engine.pp > 1 (vpp >= 1)")
    if cfg.vpp > 1 and grad_accum < cfg.pp:
        raise ValueError(f"engine.vpp={cfg.vpp}: megatron's interleaved schedule needs at least engine.pp={cfg.pp} "
                         f"micro-batches a step; trainer.grad_accum={grad_accum} (raise it, or set engine.vpp=1)")
    if cfg.tp < 1 or cfg.pp < 1 or world % (cfg.tp * cfg.pp):
        raise ValueError(f"engine.tp={cfg.tp} x engine.pp={cfg.pp} must divide the {world} processes (data-parallel "
                         f"size = world / (tp x pp))")
    if cfg.ep < 1 or (world // (cfg.tp * cfg.pp)) % cfg.ep:
        raise ValueError(f"engine.ep={cfg.ep} must divide the data-parallel size world / (tp x pp) = "
                         f"{world // (cfg.tp * cfg.pp)} (the experts are split over data-parallel ranks)")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ValueError(f"engine.dtype={cfg.dtype!r}; choose fp32 or bf16")


class _Embed(torch.nn.Module):
    """The vocabulary-parallel token embedding as HF's `get_input_embeddings()` module (ids -> [.., H])."""

    def __init__(self, decoder):
        super().__init__()
        self.__dict__["decoder"] = decoder  # not a child: its parameters are registered once, under the decoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed(ids)


class _LanguageModel(torch.nn.Module):
    """HF's text-model call on the megatron decoder (training/vlm.py `hidden_states` calls it as HF's)."""

    def __init__(self, chunks: list, media_ids: tuple = (), deepstack_layers: int = 0):
        super().__init__()
        self.decoder = chunks[0]
        if len(chunks) > 1:  # engine.vpp > 1: the schedule picks the chunk of each call (`active`)
            self.virtual_stages = torch.nn.ModuleList(chunks[1:])
        self.active = 0
        self.embed_tokens = _Embed(chunks[0])
        self.config = chunks[0].hf_config  # HF's text config (FLOP counts, the step read it)
        self.media_ids, self.deepstack_layers = media_ids, deepstack_layers  # for a pipeline's later stages

    @property
    def chunks(self) -> list:
        """This rank's Decoders, one per virtual pipeline stage (one without engine.vpp)."""
        return [self.decoder, *getattr(self, "virtual_stages", [])]

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None, cu_seq_lens_q=None,
                visual_pos_masks=None, deepstack_visual_embeds=None, use_cache=False, output_router_logits=False, **_):
        d = self.chunks[self.active]
        if inputs_embeds is None and d.pre_process:
            inputs_embeds = d.embed(input_ids)
        if cu_seq_lens_q is not None:  # packed rows: the segments say it all (sdpa_varlen adds an all-ones mask)
            attention_mask = None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("engine=megatron takes packed rows by cu_seqlens (model.attn_implementation="
                             "sdpa_varlen) or padded rows with a [B, L] mask, not a dense 4-D mask")
        L = position_ids.shape[-1]
        pad = sequence_pad(d.config, L)
        if pad:  # the sequence splits evenly over TP: `pad` tokens more, in a segment (or masked keys) of their own
            grow = lambda t: None if t is None else F.pad(t, (0, 0, 0, pad) if t.dim() == 3 else (0, pad))  # noqa
            inputs_embeds, input_ids, position_ids = grow(inputs_embeds), grow(input_ids), F.pad(position_ids, (0, pad))
            attention_mask, visual_pos_masks = grow(attention_mask), grow(visual_pos_masks)
            if cu_seq_lens_q is not None:
                cu_seq_lens_q = torch.cat([cu_seq_lens_q, cu_seq_lens_q[-1:] + pad])
        if d.config.pipeline_model_parallel_size == 1:
            hidden = d(inputs_embeds, position_ids, cu_seqlens=cu_seq_lens_q, attention_mask=attention_mask,
                       visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)[:, :L]
            if not output_router_logits:
                return SimpleNamespace(last_hidden_state=hidden)
            from training.mcore.moe import routers

            return SimpleNamespace(last_hidden_state=hidden, router_logits=tuple(r.take() for _, r in routers(d)))
        from training.mcore.pipeline import stage_forward

        if not d.pre_process and self.deepstack_layers:  # the visual tokens, where carried DeepStack features go
            visual_pos_masks = torch.isin(input_ids, torch.tensor(self.media_ids, device=input_ids.device))
        # a pipeline stage: the first one's inputs_embeds or the schedule's received tensor; a non-last stage returns
        # what it sends on (training/mcore/pipeline.py)
        hidden = stage_forward(d, position_ids, self.deepstack_layers, cu_seqlens=cu_seq_lens_q,
                               attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)
        return SimpleNamespace(last_hidden_state=hidden[:, :L] if d.post_process else hidden)


def _layout(mb: dict) -> tuple:
    """("packed", rows, length) of packed rows (cu_seqlens), ("padded", rows, length) of padded rows (a mask)."""
    rows, length = mb["input_ids"].shape
    if mb.get("cu_seqlens") is not None and mb.get("attention_mask") is None:
        return "packed", rows, length
    if mb.get("attention_mask") is None:
        raise ValueError("engine.pp > 1 runs packed rows (cu_seqlens) or padded rows (attention_mask)")
    return "padded", rows, length


def sequence_pad(config, L: int) -> int:
    """Tokens to add to a row of L so that it splits evenly over the TP ranks (sequence parallelism), else 0."""
    return (-L) % config.tensor_model_parallel_size if config.sequence_parallel else 0


class _Head(torch.nn.Module):
    """lm_head: this rank's vocabulary shard of the logits, all-gathered over TP, the padding columns cut."""

    def __init__(self, decoder):
        super().__init__()
        self.__dict__["decoder"] = decoder

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        local = self.decoder.logits(h)
        return tensor_parallel.gather_from_tensor_model_parallel_region(local)[..., :self.decoder.vocab_size]

    def fused_nll(self, h: torch.Tensor, target: torch.Tensor, w: torch.Tensor, chunk: int):
        """The lm objective's (Σ w·CE, CE) without gathering logits (training/mcore/loss.py)."""
        from megatron.core import parallel_state as ps

        from training.mcore.loss import VocabParallelNLL

        d = self.decoder
        return VocabParallelNLL.apply(h, d.head_weight(), target, w, chunk, d.vocab_size,
                                      ps.get_tensor_model_parallel_group())


def _hf_lm_state(model: torch.nn.Module) -> dict:
    """The HF text decoder's and lm_head's weights (HF names, as training/mcore/convert.py takes them)."""
    hf = model.hf
    return {k: v for k, v in hf.state_dict().items() if k.startswith(LM_PREFIXES)}


def to_megatron(model: torch.nn.Module, dtype: torch.dtype, sequence_parallel: bool = False) -> torch.nn.Module:
    """Replaces a VLM's HF text decoder and lm_head by this (TP rank, pipeline stage)'s megatron Decoder (in
    place; same weights). A later pipeline stage's VLM takes its decoder input from the schedule."""
    from megatron.core import parallel_state as ps

    from training.mcore.convert import is_tied
    from training.mcore.pipeline import build_chunks

    hf = model.hf
    text = hf.config.get_text_config()
    state = _hf_lm_state(model)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False)) or is_tied(state)
    trainable = next(p for n, p in hf.named_parameters() if n.startswith(LM_PREFIXES)).requires_grad
    chunks = build_chunks(text, state, dtype, tied, sequence_parallel=sequence_parallel)  # one, or vpp stages
    for c in chunks:
        c.requires_grad_(trainable)
        c.recompute = bool(getattr(hf, "is_gradient_checkpointing", False))  # model.gradient_checkpointing
    model.__dict__["hf_lm"] = (hf.model.language_model, hf.lm_head)  # kept for generation (Engine.generation)
    media = tuple(getattr(hf.config, k) for k in ("image_token_id", "video_token_id") if getattr(hf.config, k, None)
                  is not None)
    deepstack = len(getattr(hf.config.vision_config, "deepstack_visual_indexes", None) or [])
    hf.model.language_model = _LanguageModel(chunks, media, deepstack)  # hf.model is the VLM's `model` too
    model.pipeline_input = not chunks[0].pre_process  # per chunk under engine.vpp (Engine.forward_backward)
    model.lm_head = hf.lm_head = _Head(chunks[-1])
    # the head's weight is a (padded) vocabulary shard, not the plain [V, H] the fused chunks take: always the
    # module-call path (a TP group of one: its all-reduces are no-ops)
    model.sync_group = ps.get_tensor_model_parallel_group()
    return model


def _weights(model: torch.nn.Module) -> dict:
    """The state dict's tensors, detached (megatron's local linears add `_extra_state` entries, None here)."""
    return {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _split(state: dict, chunks: int = 1) -> tuple[list[dict], dict]:
    """([each Decoder chunk's keys without their prefix], the other keys) of a step module's state dict."""
    prefixes = [DECODER] + [f"{VIRTUAL}{c}." for c in range(chunks - 1)]
    decs = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in prefixes]
    return decs, {k: v for k, v in state.items() if not k.startswith((DECODER, VIRTUAL))}


class Engine:
    """training.engine.Engine on megatron-core tensor parallelism (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, groups: dict, stage: StageConfig, cfg: EngineConfig, micro_batch: int,
                 grad_accum: int, world: int, max_steps: int, parallel: ParallelConfig = ParallelConfig(),
                 tiled_mlp: int = 0):
        from megatron.core import parallel_state as ps

        from training.mcore import shim

        if parallel.sp_size != 1 or tiled_mlp > 1:
            raise ValueError("engine=megatron: parallel.sp_size and model.tiled_mlp are DeepSpeed's long-context "
                             "levers; set parallel.sp_size=1 and model.tiled_mlp=0 (context parallelism on megatron "
                             "needs Transformer Engine)")
        check(cfg, micro_batch, grad_accum, world, stage.optimizer.grad_clip)
        self.cfg, self.world, self.tp, self.pp, self.ep, self.vpp = cfg, world, cfg.tp, cfg.pp, cfg.ep, cfg.vpp
        self.dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        from training.mcore.pipeline import init_model_parallel

        rng = torch.get_rng_state()  # the loop seeded it per data-parallel rank; megatron's seeding must not reset it
        # rank order tp-pp-dp: a replica's tp x pp ranks are consecutive (training/engine.py replica_size)
        if cfg.pp > 1:
            init_model_parallel(cfg.tp, cfg.pp, cfg.vpp, seed=1234, order="tp-pp-dp")
        else:  # EP ranks are consecutive data-parallel ranks
            shim.init_model_parallel(cfg.tp, seed=1234, ep=cfg.ep)
        torch.set_rng_state(rng)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.sp_size, self.sp_rank = 1, 0
        # the TP and pipeline ranks of a replica train the same rows: count them once
        self.replica_rank = self.pp_rank * self.tp + self.tp_rank
        self.groups = {"dp": ps.get_data_parallel_group() if self.dp_size < world else None, "sp": None,
                       "tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
                       "ep": ps.get_expert_model_parallel_group() if self.ep > 1 else None}
        self.partitioned = False
        self.model = self._place(to_megatron(model, self.dtype, cfg.sequence_parallel))
        self.param_names = _regroup(model, groups)
        self.chunks = self.model.model.language_model.chunks
        self.decoder = self.chunks[0]
        from training.mcore.optim import DataParallel

        # after placement: with the distributed optimizer the parameters become views of megatron's buffers
        self.dp = DataParallel(self.model, self.chunks, optimizer_groups(model, self.param_names, stage),
                               tuple(stage.optimizer.betas), stage.optimizer.eps, self.decoder.config,
                               distributed=cfg.distributed_optimizer)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o.optimizer, lr_lambda(stage, max_steps))
                           for o in self.dp.optimizers]
        self.grad_clip = float(stage.optimizer.grad_clip)
        log.info("engine megatron: tp %d x pp %d%s x dp %d%s (this rank: tp %d, pp %d, dp %d), %s%s%s", self.tp,
                 self.pp, f" (vpp {self.vpp})" if self.vpp > 1 else "", self.dp_size,
                 f" (experts over ep {self.ep})" if self.ep > 1 else "", self.tp_rank, self.pp_rank,
                 self.dp_rank, cfg.dtype, ", sequence parallel" if cfg.sequence_parallel else "",
                 ", decoder layers recomputed in backward" if self.decoder.recompute else "")

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.dtype != torch.float32:
            model.to(self.dtype)
        return model

    def __call__(self, batch: dict, **kw):
        return self.model(batch, **kw)

    def forward_backward(self, micro: list[dict], fn, forward_only: bool = False, model=None) -> list[tuple]:
        """One micro-batch after the other (pp 1), or megatron's 1F1B schedule over the step's micro-batches (pp >
        1): the first stage runs the ViT, merge and its layers, the last its layers and `fn` (the objective's loss
        on the received hidden states), each stage sends on what its decoder returns. A schedule sends one shape,
        so consecutive micro-batches of one layout (packed rows of one length; padded rows of one [B, L], e.g. RL
        rollouts) run in one schedule each; gradients accumulate over them. The last stage's results reach every
        stage. engine.vpp > 1: the interleaved schedule over this rank's chunks; it needs >= pp micro-batches, so a
        held-out call with fewer (forward_only) repeats its last one and drops the repeats' results. `model`: a
        frozen model from `build_frozen` (a reference) runs its own forward-only schedule, its stages on the same
        ranks."""
        if self.pp == 1:
            return micro_batches(self, micro, fn, forward_only)
        from megatron.core import parallel_state as ps

        if model is not None and not forward_only:
            raise ValueError("a frozen model's pipeline runs forward_only")
        vlm = self.model if model is None else model
        runs: list[tuple[tuple, list[dict]]] = []  # (layout, its consecutive micro-batches)
        for mb in micro:
            key = _layout(mb)
            if runs and runs[-1][0] == key:
                runs[-1][1].append(mb)
            else:
                runs.append((key, [mb]))
        results = [r for key, run in runs for r in self._schedule(vlm, key, run, fn, forward_only)]
        box = [results]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=self.groups["pp"])
        return [(torch.tensor(ls, dtype=torch.float64), stats) for ls, stats in box[0]]

    def _schedule(self, vlm, layout: tuple, micro: list[dict], fn, forward_only: bool) -> list[tuple]:
        """One megatron schedule over micro-batches of one layout (`_layout`): [(loss sum, stats)] on the last
        stage, [] on the others."""
        from training.mcore.pipeline import forward_backward

        n = len(micro)
        if self.vpp > 1 and n < self.pp:
            if not forward_only:
                raise ValueError(f"engine.vpp > 1 trains >= engine.pp={self.pp} micro-batches of one shape a "
                                 f"schedule; got {n} of {layout} (padded rows of varying lengths, e.g. rollouts: "
                                 f"set engine.vpp=1)")
            micro = micro + [micro[-1]] * (self.pp - n)
        results = []
        ones = torch.ones((), dtype=torch.int, device=self.device)
        lm = vlm.model.language_model

        def step_func(data_iterator, chunk):
            mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in next(data_iterator).items()}
            lm.active = next(i for i, c in enumerate(lm.chunks) if c is chunk)
            vlm.pipeline_input = not chunk.pre_process
            if chunk.post_process:
                loss, loss_sum, stats = fn(mb)
                results.append((float(loss_sum), stats))
                return (loss_sum if forward_only else loss), lambda out: (out, ones, {})
            out, zero = vlm.decoder_output(mb)
            return out.last_hidden_state + zero.to(out.last_hidden_state.dtype), None

        # the schedule's send shape: a packed micro-batch is one row of its tokens (micro-batch size 1), padded rows
        # are B rows; both padded to a multiple of tp under sequence parallelism (_LanguageModel)
        kind, rows, length = layout
        tokens, batch = (rows * length, 1) if kind == "packed" else (length, rows)
        try:
            forward_backward(lm.chunks, step_func, micro, tokens + sequence_pad(self.decoder.config, tokens), batch,
                             lm.deepstack_layers, forward_only)
        finally:
            lm.active, vlm.pipeline_input = 0, not lm.chunks[0].pre_process
        return results[:n]

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this replica's share of the global mean on each of its TP ranks: gradients accumulate here and
        are summed over the data-parallel group in `step`."""
        loss.backward()

    @torch.no_grad()
    def step(self) -> tuple[Optional[float], bool]:
        """megatron's finalize_model_grads (the data-parallel reduce-scatter or all-reduce of the gradient buffers,
        the experts' over their expert-data-parallel group, TP sums of the q/k-norm and sequence-parallel norm
        gradients, a tied embedding's with its head copy), then the optimizer (training/mcore/optim.py)."""
        self.dp.finish_grads()
        norm, skipped = self.dp.step(self.grad_clip)
        if not skipped:
            for s in self.schedulers:
                s.step()
        return norm, skipped

    @property
    def param_groups(self) -> list[dict]:
        return self.dp.param_groups

    def full_state_dict(self, rank: int = 0) -> Optional[dict]:
        """HF-named full weights on global rank `rank` (a collective over the TP group of every replica)."""
        lm, rest = self._hf_lm_weights()
        if dist.is_initialized() and dist.get_rank() != rank:
            return None
        out = {k: v.cpu().clone() for k, v in rest.items()}
        out.update({k: v.cpu() for k, v in lm.items()})
        return out

    def _hf_lm_weights(self) -> tuple[dict, dict]:
        """(the decoder's and head's full weights in HF names, gathered over TP and the pipeline stages: a
        collective; the other weights, the first stage's (the ViT trains there))."""
        from training.mcore.convert import mcore_to_hf, merge_pp

        decs, rest = _split(_weights(self.model), len(self.chunks))
        text = self.model.hf.config.get_text_config()
        chunks = [_gather_tp(dec, self.tp, self.groups["tp"]) for dec in decs]  # [chunk][tp]
        if self.ep > 1:  # every EP rank's experts (the same keys and shapes on each): one dict of all of them
            from training.mcore.convert import merge_ep

            chunks = [[merge_ep(_gather_tp(sh, self.ep, self.groups["ep"]), text) for sh in c] for c in chunks]
        if self.pp == 1:
            return mcore_to_hf(chunks[0], text), rest
        # every stage's chunks, as objects (stages differ in keys): [pp][chunk][tp]; model order is chunk-major
        # (global virtual stage vp * pp + pp_rank), merged per tp
        stages = [None] * self.pp
        dist.all_gather_object(stages, [[{k: v.cpu() for k, v in sh.items()} for sh in c] for c in chunks],
                               group=self.groups["pp"])
        shards = [merge_pp([st[vp][t] for vp in range(len(chunks)) for st in stages], text, self.decoder.tied)
                  for t in range(self.tp)]
        return mcore_to_hf(shards, text), rest

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({"model": _weights(self.model),
                    "optimizer": self.dp.state_dict(), "scheduler": [s.state_dict() for s in self.schedulers],
                    "layout": self.layout(), "tied": self.decoder.tied,
                    "text_config": self.model.hf.config.get_text_config().to_dict()},
                   path / f"mcore_rank{rank:05d}.pt")

    def layout(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "ep": self.ep, "world": self.world,
                "distributed_optimizer": self.cfg.distributed_optimizer}

    def load(self, path: Path) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        f = path / f"mcore_rank{rank:05d}.pt"
        if not f.is_file():
            raise ValueError(f"{f} is missing: {path} is not an engine=megatron checkpoint of this layout "
                             f"(DeepSpeed checkpoints resume with their engine)")
        state = torch.load(f, map_location=self.device, weights_only=True)
        saved = dict(state["layout"])
        for k, old in (("vpp", 1), ("distributed_optimizer", False)):  # older checkpoints lack these
            saved.setdefault(k, old)
        if saved != self.layout():
            changed = {k: (v, self.layout()[k]) for k, v in saved.items() if self.layout().get(k) != v}
            raise ValueError(f"{path} was written with {saved} but this run has {self.layout()} "
                             f"(changed: {changed}); each rank's shards belong to the original layout, so resume "
                             f"with it, or start a new stage from the weights (model.path={path})")
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing or unexpected:
            raise ValueError(f"{f} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.dp.load_state_dict(state["optimizer"])
        for s, saved in zip(self.schedulers, state["scheduler"], strict=True):
            s.load_state_dict(saved)

    @contextmanager
    def generation(self):
        """HF generation (rollouts: stages/rollout.py) with the current weights. The HF text decoder and head that
        the megatron decoder replaced get its weights, gathered over TP and converted (every rank holds the whole
        decoder for the call: verl's way of syncing a trainer's weights into its rollout model), and are swapped
        in for the call. Under engine.pp every stage holds the whole decoder for the call (the weights gathered
        over the stages too); only the first stage's ViT is trained, so `broadcast_replica` takes its rollouts."""
        hf = self.model.hf
        lm, head = self.model.hf_lm
        full, _ = self._hf_lm_weights()
        lm.to(self.device, self.dtype), head.to(self.device, self.dtype)
        prefix = "model.language_model."
        with torch.no_grad():
            lm.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
            head.weight.copy_(full["lm_head.weight"])
        saved = hf.model.language_model, hf.lm_head
        hf.model.language_model, hf.lm_head = lm, head
        try:
            yield
        finally:
            hf.model.language_model, hf.lm_head = saved

    def broadcast_replica(self, obj):
        """`obj` as the replica's first rank (TP rank 0 of the first pipeline stage) has it: a replica's TP ranks and
        stages must train on the same rollouts, and only the first stage's ViT copy is trained."""
        if self.tp * self.pp == 1:
            return obj
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()  # the replica's tp x pp ranks (rank order tp-pp-dp: consecutive)
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def build_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy (reference, teacher) with its decoder split like the policy's (TP shards; under engine.pp
        this rank's stages, run by `forward_backward(..., model=)`)."""
        model.requires_grad_(False)
        model.eval()
        return self._place(to_megatron(model, self.dtype, self.cfg.sequence_parallel))


MOE_LEAVES = {"router": ".mlp.router.", "experts": ".mlp.experts."}  # megatron's names of a MoE llm's leaves


def _regroup(model: torch.nn.Module, groups: dict) -> dict:
    """The parameter groups with the replaced HF text decoder's names swapped for the megatron decoder's (the
    group that held the HF decoder; a MoE llm's router and experts leaves by megatron's module names, the rest of
    the decoder in its dense leaf)."""
    names = dict(model.named_parameters())
    owner = {g for g, ps in groups.items() for n in ps if n.startswith(LM_PREFIXES)}
    out = {g: [n for n in ps if not n.startswith(LM_PREFIXES) and n in names] for g, ps in groups.items()}
    lm = [n for n in names if n.startswith(LM_PREFIXES)]
    if owner == {"dense", *MOE_LEAVES}:
        for leaf, part in MOE_LEAVES.items():
            out[leaf] += [n for n in lm if part in n]
        out["dense"] += [n for n in lm if not any(part in n for part in MOE_LEAVES.values())]
    elif len(owner) > 1:
        raise ValueError(f"engine=megatron: the language model's parameters are in groups {sorted(owner)}; the "
                         f"megatron decoder trains as one group")
    elif owner:
        out[owner.pop()] += lm
    return out


def _gather_tp(state: dict, tp: int, group) -> list[dict]:
    """Every TP rank's copy of a (decoder) state dict, in TP-rank order, on every rank of the group."""
    if tp == 1:
        return [state]
    out = [{} for _ in range(tp)]
    for k, v in state.items():
        parts = [torch.empty_like(v) for _ in range(tp)]
        dist.all_gather(parts, v.contiguous(), group=group)
        for r in range(tp):
            out[r][k] = parts[r]
    return out


def checkpoint_weights(step_dir: Path) -> dict:
    """HF-named full weights of an engine=megatron checkpoint directory (its data-parallel rank 0's TP shards)."""
    from transformers import AutoConfig

    from training.mcore.convert import mcore_to_hf

    from training.mcore.convert import merge_pp

    first = torch.load(step_dir / "mcore_rank00000.pt", map_location="cpu", weights_only=True)
    layout = {"pp": 1, "vpp": 1, "ep": 1, **first["layout"]}
    tp, pp, vpp, ep = layout["tp"], layout["pp"], layout["vpp"], layout["ep"]
    # the first replica: ranks pp_rank * tp + tp_rank (rank order tp-pp-dp); with experts split over ep (tp 1, pp
    # 1): the first ep ranks
    states = [first] + [torch.load(step_dir / f"mcore_rank{r:05d}.pt", map_location="cpu", weights_only=True)
                        for r in range(1, tp * pp * ep)]
    text = dict(first["text_config"])
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    chunks, rest = zip(*(_split(s["model"], vpp) for s in states))  # [rank][chunk]
    if ep > 1:
        from training.mcore.convert import merge_ep

        shards = [merge_ep([c[0] for c in chunks], config)]
    elif pp > 1:  # rank stage * tp + t; model order chunk-major (global virtual stage vp * pp + stage)
        shards = [merge_pp([chunks[stage * tp + t][vp] for vp in range(vpp) for stage in range(pp)], config,
                           first["tied"]) for t in range(tp)]
    else:
        shards = [c[0] for c in chunks]
    out = dict(rest[0])
    out.update(mcore_to_hf(list(shards), config))
    return out


def is_checkpoint(step_dir: Path) -> bool:
    return (Path(step_dir) / "mcore_rank00000.pt").is_file()
