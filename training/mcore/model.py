"""The Qwen-VL language-model decoder on megatron-core 0.16 (local spec: no Transformer Engine needed).

`Decoder` is the HF text model (`model.language_model`) plus `lm_head`, built from megatron-core's
tensor-parallel pieces with GPTModel's module names (so training/mcore/convert.py's keys are GPTModel's):

    embedding.word_embeddings   VocabParallelEmbedding (vocabulary padded, training/mcore/convert.py)
    decoder                     TransformerBlock: layers (TransformerLayer) + final_layernorm (RMSNorm)
    output_layer                ColumnParallelLinear, vocab-parallel logits (weightless when tied)
    rotary_pos_emb              M-RoPE: megatron's MultimodalRotaryEmbedding (Qwen2/2.5-VL, chunked sections)
                                or `InterleavedMRoPE` (Qwen3-VL)

It runs the decoder layers itself rather than through `TransformerBlock.forward`, because DeepStack (Qwen3-VL)
adds visual features to the hidden states *between* layers; that block forward's extras (activation
recompute, fp8 contexts, CPU offload) are not used yet. Activations inside are megatron's [L, B, H]; the
interface is HF's [B, L, H].

Pipeline parallelism (training/mcore/pipeline.py runs the schedule): a `Decoder` is one (virtual) pipeline stage,
megatron's even split of the layers (convert.py `stage_layers`); the embedding only on the first stage, the final
norm and head only on the last; a tied head on a last stage without the embedding holds its own copy of the
embedding (megatron's `shared_embedding`), whose gradient pipeline.py all-reduces with the embedding's.

Tensor parallelism: tp must divide the query heads and either divide the key/value heads (whole query groups a
rank) or be a multiple of them (megatron replicates each key/value head over tp/groups ranks). Context parallelism
is off (the local DotProductAttention refuses it).

Sequence parallelism (megatron's, with TP: `transformer_config(..., sequence_parallel=True)`, or
pipeline.py `build_chunks(..., sequence_parallel=True)`): between layers each TP rank holds only its contiguous
1/tp slice of the sequence ([L/tp, B, H]); the column-parallel linears all-gather their input along the sequence
and the row-parallel ones reduce-scatter their output (megatron does both given the config). The interface stays
HF's: the first stage takes the full [B, L, H] and scatters it, the last gathers the full sequence after the final
norm (so the head and the loss run as without it); pipeline stages in between send their slice. RoPE and the
attention mask are the full sequence's (attention sees it whole after the qkv all-gather); DeepStack adds each
rank's visual positions to its slice. The caller must give sequences of a length divisible by tp (an engine that
turns it on pads its rows to a multiple of tp; `check_sequence_length` refuses others). The norms are `RMSNorm`
(the local spec's torch RMSNorm without its refusal), their weights tagged `sequence_parallel`: their gradients
are partial sums, completed over TP by `Decoder.reduce_tp_partial_grads`.

Qwen3-VL-MoE (training/mcore/moe.py): megatron's MoELayer in the sparse layers (HF's routing exactly, the router
outputs shown to a hookable `tap`), dense MLPs where HF keeps them, expert parallelism over the parallel state's EP
group; tp must be 1 (megatron's MoELayer trains with TP only under sequence parallelism, whose per-slice expert
gradients and router statistics are not reduced yet: see `check_moe`).

Attention: megatron's local DotProductAttention takes no packed-sequence params (that path is Transformer
Engine's) and materialises all L x L scores; `SegmentAttention` replaces it in the spec: SDPA per packed segment
(training/attention.py's sdpa_varlen, as the DeepSpeed engine), SDPA with the mask on padded rows. `recompute`
(model.gradient_checkpointing) reruns each layer in backward.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)

from training.mcore import shim
from training.mcore.convert import padded_vocab_size, stage_layers


@dataclass(frozen=True)
class Family:
    """What the three text decoders differ in. Qwen3-VL always interleaves its M-RoPE sections (HF's
    Qwen3VLTextRotaryEmbedding ignores `rope_parameters.mrope_interleaved`), so the layout follows the family."""

    qkv_bias: bool
    qk_norm: bool
    interleaved_mrope: bool
    moe: bool = False  # sparse MoE layers (training/mcore/moe.py)


FAMILIES = {  # model_type of the HF text config
    "qwen2_vl_text": Family(qkv_bias=True, qk_norm=False, interleaved_mrope=False),
    "qwen2_5_vl_text": Family(qkv_bias=True, qk_norm=False, interleaved_mrope=False),
    "qwen3_vl_text": Family(qkv_bias=False, qk_norm=True, interleaved_mrope=True),
    "qwen3_vl_moe_text": Family(qkv_bias=False, qk_norm=True, interleaved_mrope=True, moe=True),
}


def family(hf) -> Family:
    if hf.model_type not in FAMILIES:
        raise ValueError(f"text config model_type={hf.model_type!r} is not supported by the megatron decoder; "
                         f"supported: {sorted(FAMILIES)}")
    return FAMILIES[hf.model_type]


def head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def mrope_section(hf) -> list[int]:
    section = list((hf.rope_parameters or {}).get("mrope_section") or [])
    if len(section) != 3 or sum(section) != head_dim(hf) // 2:
        raise ValueError(f"rope_parameters.mrope_section={section or None} must be 3 sizes summing to head_dim/2 "
                         f"= {head_dim(hf) // 2}")
    return section


def check(hf, tp: int) -> None:
    """Refuses what the decoder does not implement, naming the field."""
    fam = family(hf)
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"rope_parameters.rope_type={rope.get('rope_type')!r} is not supported (only plain "
                         f"M-RoPE: 'default'/'mrope')")
    mrope_section(hf)
    if getattr(hf, "use_sliding_window", False) or any(t != "full_attention" for t in
                                                       (getattr(hf, "layer_types", None) or [])):
        raise ValueError("sliding window attention (use_sliding_window / layer_types) is not supported")
    if fam.moe and not getattr(hf, "num_experts", 0):
        raise ValueError(f"model_type={hf.model_type!r} is a MoE decoder but num_experts is not set")
    if not fam.moe and (getattr(hf, "num_experts", 0) or getattr(hf, "num_experts_per_tok", 0)):
        raise ValueError(f"MoE (num_experts) is not supported for model_type={hf.model_type!r}")
    if hf.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf.hidden_act!r} is not supported (only silu)")
    if getattr(hf, "attention_bias", False) and not fam.qkv_bias:
        raise ValueError("attention_bias=True is not supported (o_proj bias has no place in this spec)")
    check_tp(tp, hf.num_attention_heads, hf.num_key_value_heads, head_dim(hf), hf.intermediate_size)


def check_moe(hf, tp: int) -> None:
    """What the MoE decoder needs beyond `check`: tp=1. megatron's MoELayer trains at tp > 1 only under sequence
    parallelism, and with it (expert tensor parallelism 1) each TP rank's experts and router see only its slice
    of the tokens: the forward is right, but the experts' gradients are partial over the TP ranks (megatron sums
    them over the expert-data-parallel group, which then holds the TP peers; the engine sums them over the
    data-parallel group, or the EP group's replicas), megatron's expert grid puts EP groups across the TP peers
    (the engine splits experts over data-parallel ranks), the parallel state's expert TP size defaults to tp, and
    the routers' outputs (training/moe.py's statistics and aux loss) cover one slice. (convert.py still converts
    at any tp: the experts whole on each TP rank.)"""
    if family(hf).moe and tp != 1:
        raise ValueError(f"tensor-parallel size {tp}: the MoE decoder needs tp=1 (at tp > 1 megatron's MoELayer "
                         f"needs sequence parallelism, whose per-slice expert gradients and router statistics the "
                         f"engine does not reduce yet); use expert parallelism")


def check_tp(tp: int, heads: int, groups: int, head_dim: int, intermediate: int, what: str | None = None) -> None:
    """The tensor-parallel sizes the decoder's shapes split into (`what` names the setting in the message).
    tp | groups: each rank holds whole query groups. tp a multiple of groups: megatron's SelfAttention all-gathers
    linear_qkv's output and each rank keeps its group's k/v (replicated over tp/groups ranks)."""
    what = what or f"tensor-parallel size {tp}"
    if tp < 1 or heads % tp or (groups % tp and tp % groups) or (heads + 2 * groups) * head_dim % tp:
        raise ValueError(f"{what} must divide num_attention_heads={heads} and either divide "
                         f"num_key_value_heads={groups} or be a multiple of it")
    if intermediate % tp:
        raise ValueError(f"{what} must divide intermediate_size={intermediate}")


def transformer_config(hf, tp: int, dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """megatron's TransformerConfig of an HF Qwen-VL text config. `overrides` go to TransformerConfig (e.g.
    perform_initialization=False when weights are loaded anyway). The RoPE base is not a TransformerConfig field
    in megatron-core 0.16 (GPTModel takes it as an argument): `Decoder` reads it from the HF config. MoE: the
    fields of training/mcore/moe.py `config_fields` at expert_model_parallel_size (an override, default 1)."""
    check(hf, tp)
    check_moe(hf, tp)
    fam = family(hf)
    args = dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, num_query_groups=hf.num_key_value_heads,
        kv_channels=head_dim(hf), normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=fam.qkv_bias,
        qk_layernorm=fam.qk_norm, mrope_section=mrope_section(hf),
        hidden_dropout=0.0, attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=hf.initializer_range, tensor_model_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # pipeline p2p: hidden states travel in params_dtype. On CPU (gloo) unbatched isend/irecv: gloo matches a
        # rank pair's messages in posting order, and at pp=2 the interleaved schedule batches a send to the next
        # and one to the previous stage, the same peer, which the peer posts the other way round (wrong tensors
        # arrive). megatron's unbatched path puts the two directions on two process groups at pp=2, and it
        # skips the torch.cuda.synchronize() that follows batch_isend_irecv
        pipeline_dtype=dtype, batch_p2p_comm=torch.cuda.is_available(),
        # unfused torch paths: the fused kernels need CUDA (and Apex/TE)
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    if fam.moe:
        from training.mcore import moe

        args.update(moe.config_fields(hf, overrides.get("expert_model_parallel_size", 1)))
    return TransformerConfig(**{**args, **overrides})


class InterleavedMRoPE(MultimodalRotaryEmbedding):
    """Qwen3-VL's M-RoPE: frequency i is driven by the t, h or w position as HF's
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies` interleaves them (h at i = 1, 4, .. < 3*section[1],
    w at i = 2, 5, .. < 3*section[2], t elsewhere), not in megatron's contiguous chunks. Same interface as the
    parent: position ids [3, B, L] -> angles [L, B, 1, head_dim]."""

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None) -> torch.Tensor:
        half = self.inv_freq.numel()
        axis = torch.zeros(half, dtype=torch.long, device=self.inv_freq.device)
        axis[1:3 * mrope_section[1]:3] = 1
        axis[2:3 * mrope_section[2]:3] = 2
        freqs = position_ids.to(self.inv_freq.device).float()[..., None] * self.inv_freq  # [3, B, L, half]
        freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:3], half))[0]  # [B, L, half]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, :, None, :].transpose(0, 1).contiguous()  # [L, B, 1, head_dim]


def _mark_sharded(model: torch.nn.Module) -> None:
    """megatron sets `tensor_model_parallel` on its parallel layers' weights only when it initialises them
    (perform_initialization), but gradient norms and checkpoints need it on loaded weights too: the column-parallel
    weights and biases and the vocabulary-parallel embedding (dim 0), the row-parallel weights (dim 1)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for m in model.modules():
        parts = {tensor_parallel.ColumnParallelLinear: (("weight", 0), ("bias", 0)),
                 tensor_parallel.RowParallelLinear: (("weight", 1),),
                 tensor_parallel.VocabParallelEmbedding: (("weight", 0),)}.get(type(m), ())
        for name, dim in parts:
            p = getattr(m, name, None)
            if isinstance(p, torch.nn.Parameter) and not hasattr(p, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(p, True, dim, 1)


class RMSNorm(torch.nn.RMSNorm):
    """The norm of every layer spec here (input, pre-MLP, q/k norms) and the final norm: torch's RMSNorm, as the
    local spec's `WrappedTorchNorm` builds it, minus that wrapper's refusal of sequence parallelism. Under it the
    weight is tagged `sequence_parallel` (megatron's tag, as Transformer Engine's norms set it): the input, pre-MLP
    and final norms see only this rank's slice of the sequence, so each TP rank's weight gradient is a partial
    sum (`Decoder.reduce_tp_partial_grads` completes it). The q/k norms see the whole sequence but only this
    rank's heads, and are summed over TP with or without the tag."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


class SegmentAttention(DotProductAttention):
    """The local spec's core attention without its [B, heads, L, L] scores: SDPA per packed segment.

    megatron's DotProductAttention materialises the scores of every query and key of the row, masked, and keeps
    the softmax for backward: heads/tp x L^2 values a layer, most of them masked out on packed rows (1 GiB a head
    at 16K tokens). Here, with `segments` set (a packed row's cu_seqlens; `Decoder.forward` sets it on every
    layer's module before the layers run), attention is training/attention.py's sdpa_varlen, the DeepSpeed
    engine's: SDPA causally per segment, segments of a length class batched, no mask (on GPUs SDPA may take its
    flash kernel). Padded rows (no segments) run SDPA with the [B, 1, L, L] mask, each query also seeing itself so
    a padding query gets no empty softmax. The segments are not given through megatron's `packed_seq_params`:
    SelfAttention would then apply RoPE per sequence (THD), but our M-RoPE is computed for the packed row."""

    segments: torch.Tensor | None = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [L, B, heads, D], key/value [L, B, groups, D] (this rank's) -> [L, B, heads x D]."""
        from training.attention import sdpa_varlen_forward

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SegmentAttention takes neither packed_seq_params nor attention_bias")
        L, B, heads, D = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, heads, L, D]
        if self.segments is not None:
            if B != 1:
                raise ValueError(f"segments describe one packed row; got {B} rows")
            out, _ = sdpa_varlen_forward(self, q, k, v, None, scaling=self.softmax_scale,
                                         cu_seq_lens_q=self.segments.to(query.device))
            return out.reshape(L, B, heads * D)  # [1, L, heads, D] -> [L, 1, heads x D]
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask | torch.eye(L, dtype=torch.bool, device=query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                             scale=self.softmax_scale, enable_gqa=heads != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(L, B, heads * D)


def local_modules(spec):
    """A megatron layer or block spec with `RMSNorm` for every `WrappedTorchNorm` in it (through the ModuleSpec
    submodules) and as a block's final norm (TransformerBlock builds it from `layer_norm`; a bare layer spec
    would get megatron's default, WrappedTorchNorm without Apex / TE), and `SegmentAttention` for megatron's
    DotProductAttention."""
    if spec is WrappedTorchNorm:
        return RMSNorm
    if spec is DotProductAttention:
        return SegmentAttention
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[local_modules(s) for s in spec.layer_specs], layer_norm=RMSNorm)
    if isinstance(spec, ModuleSpec) and dataclasses.is_dataclass(spec.submodules):
        sub = spec.submodules
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            sub, **{f.name: local_modules(getattr(sub, f.name)) for f in dataclasses.fields(sub) if f.init}))
    return spec


def check_sequence_length(config: TransformerConfig, L: int) -> None:
    """Sequence parallelism splits the sequence evenly over the TP ranks: L must be a multiple of tp."""
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel and L % tp:
        raise ValueError(f"sequence length {L} is not divisible by the tensor-parallel size {tp}: sequence "
                         f"parallelism gives each TP rank L/tp positions (pad the rows to a multiple of {tp})")


def causal_mask(L: int, cu_seqlens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                device=None) -> torch.Tensor:
    """megatron's attention mask (bool, True = masked out): causal within each cu_seqlens segment of one packed
    row ([1, 1, L, L]), or causal over the valid keys of padded rows (attention_mask [B, L] of 0/1 ->
    [B, 1, L, L]). A padding query's output is meaningless either way; a query never sees a later key."""
    allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None]
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device)
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        if seg.numel() != L:
            raise ValueError(f"cu_seqlens covers {seg.numel()} tokens but the row has {L}")
        allowed = allowed & (seg[:, None] == seg[None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return ~allowed[:, None]


class Decoder(torch.nn.Module):
    """The text decoder + LM head of one Qwen-VL family on megatron-core, for this process's tensor-parallel
    rank and (virtual) pipeline stage `vp_stage` (megatron's parallel state must be initialised:
    training/mcore/shim.py or pipeline.py `init_model_parallel`). `pre_process` / `post_process` (embedding /
    final norm and head here) default to whether this is the first / last stage."""

    model_type = ModelType.encoder_or_decoder  # what megatron's pipeline schedules ask the model

    def __init__(self, hf_text_config, config: TransformerConfig | None = None, tied: bool = False,
                 pre_process: bool | None = None, post_process: bool | None = None, vp_stage: int | None = None):
        super().__init__()
        shim.apply()  # before any megatron module is built (they allocate on torch.cuda.current_device())
        tp = ps.get_tensor_model_parallel_world_size()
        pp, vpp = ps.get_pipeline_model_parallel_world_size(), ps.get_virtual_pipeline_model_parallel_world_size()
        self.hf_config = hf_text_config
        is_moe, ep = family(hf_text_config).moe, ps.get_expert_model_parallel_world_size()
        self.config = config or transformer_config(hf_text_config, tp, pipeline_model_parallel_size=pp,
                                                   virtual_pipeline_model_parallel_size=vpp,
                                                   **({"expert_model_parallel_size": ep} if is_moe else {}))
        if is_moe and self.config.expert_model_parallel_size != ep:
            raise ValueError(f"config is for ep={self.config.expert_model_parallel_size}, the parallel state has {ep}")
        if self.config.tensor_model_parallel_size != tp:
            raise ValueError(f"config is for tp={self.config.tensor_model_parallel_size}, the parallel state has {tp}")
        if (self.config.pipeline_model_parallel_size, self.config.virtual_pipeline_model_parallel_size) != (pp, vpp):
            raise ValueError(f"config is for pp={self.config.pipeline_model_parallel_size}, vpp="
                             f"{self.config.virtual_pipeline_model_parallel_size}; the parallel state has pp={pp}, "
                             f"vpp={vpp}")
        if (vpp is None) != (vp_stage is None):
            raise ValueError(f"vp_stage={vp_stage} with virtual pipeline size {vpp}: give both or neither")
        self.vp_stage = vp_stage
        self.pre_process = ps.is_pipeline_first_stage(False, vp_stage) if pre_process is None else pre_process
        self.post_process = ps.is_pipeline_last_stage(False, vp_stage) if post_process is None else post_process
        self.input_tensor = None  # the previous stage's output, set by the schedule (`set_input_tensor`)
        self.recompute = False  # activation checkpointing per layer (model.gradient_checkpointing; the engine sets it)
        self.tied = tied
        self.vocab_size = hf_text_config.vocab_size
        self.padded_vocab_size = padded_vocab_size(self.vocab_size, tp)
        self.mrope_section = self.config.mrope_section
        self.deepstack = family(hf_text_config).interleaved_mrope  # only Qwen3-VL takes DeepStack features

        if self.pre_process:
            self.embedding = torch.nn.Module()  # GPTModel's name: embedding.word_embeddings
            self.embedding.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, self.config.hidden_size, init_method=self.config.init_method,
                config=self.config)
        rope = InterleavedMRoPE if family(hf_text_config).interleaved_mrope else MultimodalRotaryEmbedding
        self.rotary_pos_emb = rope(kv_channels=self.config.kv_channels, rotary_percent=1.0,
                                   rotary_base=hf_text_config.rope_parameters["rope_theta"])
        if is_moe:
            from training.mcore import moe

            spec = moe.block_spec(self.config, vp_stage)
        else:
            layer = get_gpt_layer_local_spec(qk_layernorm=self.config.qk_layernorm, normalization="RMSNorm")
            spec = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(self.config, vp_stage),
                                              layer_norm=RMSNorm)
        self.decoder = TransformerBlock(self.config, local_modules(spec), pre_process=self.pre_process,
                                        post_process=self.post_process, vp_stage=vp_stage)
        self.layer_indices = [layer.layer_number - 1 for layer in self.decoder.layers]  # global, 0-based
        want = stage_layers(self.config.num_layers, pp, ps.get_pipeline_model_parallel_rank(), vpp, vp_stage)
        if self.layer_indices != list(want):  # convert.py's split must be megatron's
            raise ValueError(f"megatron built layers {self.layer_indices}, convert.py expects {list(want)}")
        if self.post_process:
            # the head takes the full sequence (forward gathers it after the final norm, so `logits` and
            # training/mcore/loss.py see what they see without sequence parallelism): built without it, the head
            # does not all-gather its input again, and its input gradient is all-reduced over TP (whole on every
            # rank, as the loss's own), which is what the gather's backward expects
            head_config = self.config
            if self.config.sequence_parallel:
                head_config = copy.copy(self.config)
                head_config.sequence_parallel = False
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                self.config.hidden_size, self.padded_vocab_size, config=head_config,
                init_method=self.config.init_method, bias=False, gather_output=False,
                skip_weight_param_allocation=tied and self.pre_process)
            if tied and not self.pre_process:  # the embedding's copy (loaded from it by convert.py)
                self.output_layer.weight.shared_embedding = True
        # the local spec's torch RMSNorm ignores params_dtype (float32 weights); Megatron-LM's Float16Module casts
        # the whole model for bf16/fp16, as here (the rotary inv_freq is no buffer and stays float32)
        self.to(self.config.params_dtype)
        _mark_sharded(self)

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedule hands a non-first stage the received hidden states here ([tensor] or tensor)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight shard on a last stage: the embedding's when tied on the same stage, else
        output_layer's (a tied copy on a pipeline's last stage)."""
        return self.embedding.word_embeddings.weight if self.tied and self.pre_process else self.output_layer.weight

    def sharded(self, p: torch.nn.Parameter) -> bool:
        """Whether `p` is this rank's shard of a tensor-parallel weight (else a replica of a whole one)."""
        return bool(getattr(p, "tensor_model_parallel", False))

    def expert_parallel(self, p: torch.nn.Parameter) -> bool:
        """Whether `p` is one of this EP rank's own experts (ep > 1; megatron's `allreduce=False`): its gradient is
        summed over the expert-data-parallel group (ps.get_expert_data_parallel_group()), not the data-parallel one."""
        return not getattr(p, "allreduce", True)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, H] (full hidden size: the vocab-parallel lookup is all-reduced over TP).
        HF builds `nn.Embedding(padding_idx=pad_token_id)`, whose lookup gives the pad row no gradient (the pad
        token also occurs as a real token, e.g. <|endoftext|>); the lookups of pad ids are detached to match.
        A tied LM head's gradient still reaches that row, as in HF."""
        out = self.embedding.word_embeddings(input_ids)
        pad = self.hf_config.pad_token_id
        if pad is None or not torch.is_grad_enabled():
            return out
        return torch.where((input_ids == pad)[..., None], out.detach(), out)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, visual_pos_masks: torch.Tensor | None = None,
                deepstack_visual_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states [B, L, H] (after the final norm), as HF's `last_hidden_state` for the same inputs.

        position_ids: the M-RoPE ids HF's text model takes, [3, B, L], or [4, B, L] (row 0, the text positions,
        dropped: the boundaries come from cu_seqlens here), or [B, L] (text only). cu_seqlens: the segments of a
        packed row (B = 1); attention_mask: padded rows [B, L] of 0/1; neither: plain causal. DeepStack
        (Qwen3-VL): after layer k < len(deepstack_visual_embeds), hidden[visual_pos_masks] += embeds[k] (HF's
        [n_visual, H]); an entry may instead be dense in megatron's layout (this rank's [L or L/tp, B, H], zero
        off the visual positions: the features pipeline.py carries), added whole. Pipeline stages: inputs_embeds
        is the previous stage's output, k the global layer index (entries of layers on other stages are not read),
        and the final norm is applied on the last stage only. Sequence parallelism (module docstring): the first
        stage takes the full sequence, later ones this rank's slice [B, L/tp, H] (what the previous stage
        returned); the last returns the full sequence, earlier ones this rank's slice. L (position_ids) must be
        divisible by tp."""
        B, Lin, _ = inputs_embeds.shape
        L = position_ids.shape[-1]
        sp, tp_group = self.config.sequence_parallel, ps.get_tensor_model_parallel_group()
        check_sequence_length(self.config, L)
        if Lin != (L if self.pre_process or not sp else L // self.config.tensor_model_parallel_size):
            raise ValueError(f"hidden states of {Lin} positions for position ids of {L}"
                             f"{' (sequence parallel: a later stage takes L/tp)' if sp else ''}")
        if cu_seqlens is not None and (B != 1 or attention_mask is not None):
            raise ValueError("cu_seqlens describes one packed row [1, N, H] and takes no attention_mask")
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        if deepstack_visual_embeds and not self.deepstack:
            raise ValueError(f"{self.hf_config.model_type} has no DeepStack; got deepstack_visual_embeds")
        rope = self.rotary_pos_emb(position_ids, self.mrope_section)  # the full sequence's, as the mask
        # packed rows: the segments, set on each layer's SegmentAttention (no L x L mask); padded rows: the mask
        mask = None if cu_seqlens is not None else causal_mask(L, None, attention_mask, device=inputs_embeds.device)
        if cu_seqlens is not None and int(cu_seqlens[-1]) != L:
            raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens but the row has {L}")

        def run(layer, h):  # the segments are this call's, also when backward recomputes the layer
            layer.self_attention.core_attention.segments = cu_seqlens
            return layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rope)[0]

        h = inputs_embeds.transpose(0, 1)  # megatron's [L, B, H]
        if sp and self.pre_process:  # this rank's slice; backward all-gathers (the embedding's gradient is whole)
            h = tensor_parallel.scatter_to_sequence_parallel_region(h, group=tp_group)
        if deepstack_visual_embeds and visual_pos_masks is not None:
            b, l = visual_pos_masks.to(inputs_embeds.device).nonzero(as_tuple=True)  # HF's [B, L] order
            if sp:  # the visual positions in this rank's slice, and which rows of embeds[k] they take
                lo = ps.get_tensor_model_parallel_rank() * h.shape[0]
                mine = (l >= lo) & (l < lo + h.shape[0])
                b, l = b[mine], l[mine] - lo
        for k, layer in zip(self.layer_indices, self.decoder.layers):
            if self.recompute and torch.is_grad_enabled():  # keep the layer's input only; rerun it in backward
                h = torch.utils.checkpoint.checkpoint(run, layer, h, use_reentrant=False)
            else:
                h = run(layer, h)
            if deepstack_visual_embeds and k < len(deepstack_visual_embeds):
                e = deepstack_visual_embeds[k].to(h.dtype)
                if e.ndim == 3:
                    h = h + e  # dense: + 0 off the visual positions, the same sums as index_put
                    continue
                if sp:  # backward sums the ranks' rows (each gives its own): the features' gradient whole on each
                    e = tensor_parallel.copy_to_tensor_model_parallel_region(e, group=tp_group)[mine]
                h = h.index_put((l, b), e, accumulate=True)
        if self.post_process:
            h = self.decoder.final_layernorm(h)
            if sp:  # the full sequence; the head's (or the loss's) gradient is whole on every rank: backward splits
                h = tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False,
                                                                         group=tp_group)
        return h.transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits [..., padded_vocab_size / tp]. The padded columns
        (ids >= vocab_size) are 0 from zero weights: mask them before any softmax over the vocabulary."""
        weight = self.embedding.word_embeddings.weight if self.tied and self.pre_process else None
        return self.output_layer(hidden, weight=weight)[0]

    def load(self, state_dict: dict) -> None:
        """load_state_dict of a training/mcore/convert.py state dict. The local linears' `_extra_state` (None:
        Transformer Engine's fp8 metadata slot) is not converted; every other key must match."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the decoder: missing {missing}, unexpected {unexpected}")

    def reduce_tp_partial_grads(self) -> None:
        """Sums over the tensor-parallel group the gradients each TP rank holds only a part of, as megatron's
        finalize_model_grads (`_allreduce_non_tensor_model_parallel_grads`) does, in one coalesced all-reduce: the
        q/k-norm weights (replicated, but each rank applies them to its own heads only) and, under sequence
        parallelism, every weight tagged `sequence_parallel` (the other norms, and MoE routers: they see this
        rank's slice of the sequence only). Every other replicated weight (without sequence parallelism, the norms
        before column-parallel layers) already gets the full gradient on every rank."""
        if ps.get_tensor_model_parallel_world_size() == 1:
            return
        sp = self.config.sequence_parallel
        grads = [p.grad for name, p in self.named_parameters() if p.grad is not None and (
            "q_layernorm" in name or "k_layernorm" in name or (sp and getattr(p, "sequence_parallel", False)))]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(summed)
