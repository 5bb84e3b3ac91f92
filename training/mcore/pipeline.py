"""Pipeline parallelism of the megatron Decoder (training/mcore/model.py) under megatron-core's schedules.

A pipeline rank holds one `Decoder` per virtual stage ("chunk"), built by `build_chunks` from HF weights
(convert.py `hf_to_mcore` at its (tp rank, pp rank, vp stage)). `forward_backward` runs megatron's
`get_forward_backward_func()` (1F1B; interleaved 1F1B with vpp) over a list of micro-batches; the caller's
`forward_step_func(data_iterator, chunk)` calls `stage_forward` and returns (output, loss_func) as megatron wants,
the loss_func returning (per-token loss sum, token count, logs): gradients are those of the summed loss
(`calculate_per_token_loss`), the caller divides. `finalize_grads` then completes the gradients.

What travels between stages, one fixed shape per micro-batch: [(1 + c)·N, B, H] (N tokens of B rows: a packed
micro-batch is [N = rows·seq_len, 1, H]), the hidden states on top of c DeepStack features, dense ([N, B, H],
zero off the visual tokens). DeepStack (Qwen3-VL) adds feature k after global layer k; the features come from the
ViT, which runs on the first stage, so those of layers past the first chunk (`carried`) ride along with the hidden
states, and their gradients come back the same way to the ViT. They are stacked along the sequence dimension
because the interleaved schedule sends [seq_length, micro_batch_size, hidden_size] with no way to widen the last.
A later stage adds the features it takes densely (+ 0 off the visual tokens: the same sums as HF's index add).

Sequence parallelism (`build_chunks(..., sequence_parallel=True)`, model.py): megatron's schedules then send
[seq_length / tp, B, H], and each TP rank sends its own slice of the hidden states stacked on its own slices of the
carried features, [(1 + c)·N/tp, B, H] (the first stage scatters each dense feature as it scatters the hidden
states): the pipeline peers are the same TP rank on each stage, so the receiver splits the stack the same way.
N must be divisible by tp (`forward_backward` refuses it otherwise).

On CPU the schedule runs under shim.cuda_factories_on_cpu() and p2p is megatron's unbatched isend/irecv (model.py
`transformer_config`: batched, gloo hands the interleaved schedule's pp=2 tensors to the wrong receive).

Tied embeddings: the last stage's head holds a copy of the embedding (convert.py), and `finalize_grads`
all-reduces the two gradients over megatron's embedding group (first and last pipeline stage): what megatron's
`finalize_model_grads` (`_allreduce_word_embedding_grads`) does, on `.grad` instead of DDP's `main_grad`.
Megatron's `LanguageModule.setup_embeddings_and_output_layer` is not used (the copy is loaded, not all-reduced
from zeros; it calls `weight.data.cuda()`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from training.mcore import shim
from training.mcore.convert import hf_to_mcore, is_tied, stage_layers


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 0,
                        order: str = "tp-cp-ep-dp-pp") -> bool:
    """megatron's parallel state for (tp, pp, vpp) (data parallel = world / (tp·pp)) on the existing process
    group (torchrun), then shim's seeding. pp=1: shim.init_model_parallel (it may make a one-process group).
    vpp=None or 1: no interleaving. `order`: megatron's rank order (the engine's "tp-pp-dp" keeps a replica's
    tp·pp ranks consecutive). Returns whether it created the process group (for shim.destroy)."""
    vpp = None if vpp == 1 else vpp
    if pp == 1:
        if vpp is not None:
            raise ValueError(f"virtual pipeline size {vpp} needs pp > 1")
        return shim.init_model_parallel(tp, seed)
    if not dist.is_initialized() or dist.get_world_size() % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} must divide the processes of an initialised process group (torchrun)")
    shim.apply()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, order=order)
    shim.manual_seed(seed)
    return False


def build_chunks(hf_text_config, hf_state_dict: dict, dtype: torch.dtype = torch.float32, tied: bool | None = None,
                 **config_overrides) -> list:
    """This rank's Decoder chunks (one per virtual stage, in vp_stage order) with their HF weights. The config is
    model.py's `transformer_config` for the parallel state, with `calculate_per_token_loss` (see the module
    docstring) and `config_overrides`."""
    from training.mcore.model import Decoder, transformer_config

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    tied = is_tied(hf_state_dict) if tied is None else tied
    stage_layers(hf_text_config.num_hidden_layers, pp, pp_rank, vpp, None if vpp is None else 0)  # refuses a bad split
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    moe = {"expert_model_parallel_size": ep} if getattr(hf_text_config, "num_experts", None) else {}
    config = transformer_config(hf_text_config, tp, dtype, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp, calculate_per_token_loss=True,
                                **{"perform_initialization": False, **moe, **config_overrides})
    chunks = []
    for vp in [None] if vpp is None else range(vpp):
        chunk = Decoder(hf_text_config, config, tied=tied, vp_stage=vp)
        chunk.load(hf_to_mcore(hf_state_dict, hf_text_config, tp, tp_rank, tied, pp, pp_rank, vpp, vp,
                               **({"ep": ep, "ep_rank": ep_rank} if moe else {})))
        chunks.append(chunk)
    return chunks


def carried(config, deepstack_layers: int) -> range:
    """The DeepStack features (by layer index) that travel with the hidden states: those of layers after the
    first chunk's, of the `deepstack_layers` the model has."""
    first = config.num_layers // (config.pipeline_model_parallel_size
                                  * (config.virtual_pipeline_model_parallel_size or 1))
    return range(min(first, deepstack_layers), deepstack_layers)


def stage_forward(chunk, position_ids: torch.Tensor, deepstack_layers: int = 0, cu_seqlens=None, attention_mask=None,
                  inputs_embeds=None, visual_pos_masks=None, deepstack_visual_embeds=None) -> torch.Tensor:
    """One chunk's forward inside the schedule (Decoder.forward's arguments). The first chunk takes
    inputs_embeds [B, N, H] and the DeepStack features (HF's list) from the caller; the others take the tensor
    the schedule received. Every chunk needs the micro-batch's position ids, cu_seqlens / attention_mask and
    visual_pos_masks. Returns the final hidden states [B, N, H] on the last chunk, else the tensor to send
    (module docstring)."""
    carry = carried(chunk.config, deepstack_layers)
    if chunk.pre_process:
        h = inputs_embeds
        ds = deepstack_visual_embeds
        extra = [_dense(ds[k] if ds else None, visual_pos_masks, h) for k in carry]
        if chunk.config.sequence_parallel:  # this rank's slice of each, as of the hidden states (module docstring)
            extra = [tensor_parallel.scatter_to_sequence_parallel_region(
                e, group=ps.get_tensor_model_parallel_group()) for e in extra]
    else:
        parts = chunk.input_tensor.chunk(1 + len(carry), dim=0)
        h, extra = parts[0].transpose(0, 1), list(parts[1:])
        ds = None
        if carry and visual_pos_masks is not None:  # dense, in the hidden states' layout: the Decoder adds them
            ds = [None] * carry.start + extra
    out = chunk(h, position_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=ds)
    return out if chunk.post_process else torch.cat([out.transpose(0, 1), *extra], dim=0)


def _dense(feats, mask, h: torch.Tensor) -> torch.Tensor:
    """One DeepStack feature [n_visual, H] as a dense [N, B, H] (zero elsewhere; all zero without one)."""
    out = h.new_zeros(h.shape)
    if feats is not None and mask is not None:
        out = out.index_put(mask.to(h.device).nonzero(as_tuple=True), feats.to(h.dtype))
    return out.transpose(0, 1)


def forward_backward(chunks: list, forward_step_func, microbatches: list, seq_length: int, micro_batch_size: int = 1,
                     deepstack_layers: int = 0, forward_only: bool = False) -> list:
    """megatron's schedule for the parallel state (no pipelining, 1F1B, or interleaved 1F1B) over
    `microbatches` (each chunk iterates over all of them). seq_length x micro_batch_size: the schedule's
    hidden-state shape (tokens per row x rows, or N x 1 for one packed row of N tokens); the carried DeepStack
    features are added here. Returns the loss_funcs' logs on the last stage ([] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from training.mcore.model import check_sequence_length

    check_sequence_length(chunks[0].config, seq_length)  # sequence parallel: the schedule sends seq_length / tp
    c = len(carried(chunks[0].config, deepstack_layers))
    with shim.cuda_factories_on_cpu():
        return get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=[iter(microbatches) for _ in chunks],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
            seq_length=(1 + c) * seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def finalize_grads(chunks: list) -> None:
    """After the schedule's backward: the partial gradients summed over TP (q/k norms; under sequence parallelism
    the other norms too: Decoder.reduce_tp_partial_grads), and a tied embedding's gradient summed with its head
    copy's over the embedding group (first and last pipeline stage; both then hold the whole gradient)."""
    for chunk in chunks:
        chunk.reduce_tp_partial_grads()
    if not chunks[0].tied or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    if not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return
    tied = [c.embedding.word_embeddings.weight for c in chunks if c.pre_process] + \
           [c.output_layer.weight for c in chunks if c.post_process and not c.pre_process]
    for w in tied:  # one per rank of the group: the first stage's embedding, the last stage's copy
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=ps.get_embedding_group())
