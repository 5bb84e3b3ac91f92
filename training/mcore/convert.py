"""HF <-> megatron-core weights of the Qwen-VL text decoder and LM head, split over tensor-parallel ranks.

HF keys are the `*ForConditionalGeneration` ones (`model.language_model.…`, `lm_head.weight`); megatron keys are
GPTModel's, which training/mcore/model.py's `Decoder` uses. Per layer i (HF `layers.i.`, megatron
`decoder.layers.i.`), with the split each TP rank gets:

    input_layernorm                  -> input_layernorm                  replicated
    self_attn.{q,k,v}_proj (+bias)   -> self_attention.linear_qkv        rows [q heads of g; k_g; v_g] for each
                                                                         query group g; rank r: the r-th 1/tp
    self_attn.{q,k}_norm (Qwen3-VL)  -> self_attention.{q,k}_layernorm   replicated
    self_attn.o_proj                 -> self_attention.linear_proj       input columns (the rank's heads)
    post_attention_layernorm         -> pre_mlp_layernorm                replicated
    mlp.{gate,up}_proj               -> mlp.linear_fc1                   rank r: [gate rows r; up rows r]
    mlp.down_proj                    -> mlp.linear_fc2                   input columns
    embed_tokens, lm_head            -> embedding.word_embeddings,       vocabulary rows, padded with zero rows to
                                        output_layer                     `padded_vocab_size` (stripped back)
    norm                             -> decoder.final_layernorm          replicated

linear_qkv is split like any column-parallel weight, contiguous rows: for tp dividing the G query groups that is
G/tp whole groups a rank; for tp a multiple of G it is a slice of one group, and megatron all-gathers the qkv
output in the forward and keeps the rank's group (its k/v replicated over tp/G ranks, its own q heads).
megatron's SwiGLU chunks linear_fc1's output in two and applies silu to the first half, so gate comes first.
Tied embeddings (the real small checkpoints): no `output_layer.weight`; HF gets `lm_head.weight` back as the
embedding (the same tensor, as HF's own state_dict has it).

Resharding tp=a -> tp=b is `mcore_to_hf` of the a shards, then `hf_to_mcore` at b for every rank: simple, exact,
and it holds one full copy of the weights at a time.

Pipeline parallelism: the model is cut into pp * vpp chunks of equal layer counts, in model order chunk
j = vp_stage * pp + pp_rank (megatron's interleaving: pipeline rank r holds chunks r, r + pp, ...), chunk j holding
global layers [j*n, (j+1)*n) renumbered 0..n-1 (`stage_layers`). The embedding lives in chunk 0, the final norm and
head in the last chunk; a tied head there gets `output_layer.weight`, a copy of the embedding (megatron's shared
embedding of a last stage), dropped again by `merge_pp`. A (tp, pp) layout is held as shards[tp_rank][j];
`merge_pp` / `split_pp` go between one TP rank's chunks and its pp=1 dict, `reshard_pp` changes tp, pp and vpp.

MoE layers (Qwen3-VL-MoE; which layers are sparse: `sparse_layers`, HF's rule), per layer i:

    mlp.gate                         -> mlp.router                       replicated
    mlp.experts.gate_up_proj[e]      -> mlp.experts.local_experts.j.     EP rank r of ep: experts e = r*E/ep + j,
                                        linear_fc1                       j = 0 .. E/ep - 1; whole over TP
    mlp.experts.down_proj[e]         -> mlp.experts.local_experts.j.     (expert tensor parallelism 1)
                                        linear_fc2

HF's gate_up_proj[e] is already [gate; up] ([2I, H]), megatron's fc1 layout. `hf_to_mcore(..., ep, ep_rank)` gives
one EP rank's experts; `mcore_to_hf` takes ep=1 dicts (all experts): an (tp, ep) layout is held as
shards[tp_rank][ep_rank], and `merge_ep` / `split_ep` go between one TP rank's EP dicts and its ep=1 dict (experts
renumbered globally / locally), `reshard_ep` changes tp and ep.
"""
from __future__ import annotations

import re

import torch

HF = "model.language_model."
LM_HEAD = "lm_head.weight"
VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default

# (HF name in layer i, megatron name in layer i, split dim or None when replicated); qkv and fc1 are built apart
_PLAIN = [("input_layernorm.weight", "input_layernorm.weight", None),
          ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", None),
          ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", None),
          ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", None),
          ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", 1),
          ("mlp.down_proj.weight", "mlp.linear_fc2.weight", 1)]


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron-LM's padding: the vocabulary rounded up to a multiple of divisible_by * tp (each rank's shard a
    multiple of divisible_by). It depends on tp, so every conversion pads and strips it."""
    m = divisible_by * tp
    return -(-vocab_size // m) * m


def _shard(t: torch.Tensor, tp: int, rank: int, dim: int | None) -> torch.Tensor:
    return t.clone() if dim is None else t.chunk(tp, dim)[rank].clone()


def _groups(hf_text_config) -> tuple[int, int, int]:
    """(query groups, query heads per group, head_dim)."""
    from training.mcore.model import head_dim

    groups = hf_text_config.num_key_value_heads
    return groups, hf_text_config.num_attention_heads // groups, head_dim(hf_text_config)


def _to_qkv(q, k, v, groups: int) -> torch.Tensor:
    """HF q/k/v rows (or biases) -> megatron's per-group interleaved rows [q_g (n heads); k_g; v_g] for g."""
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)],
                     dim=1).reshape(-1, *rest)


def _from_qkv(qkv, groups: int, per_group: int, hd: int):
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * hd, *rest).split([per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def is_tied(hf_state_dict: dict) -> bool:
    """No lm_head, or an lm_head sharing the embedding's storage (HF's state_dict of a tied model)."""
    head, emb = hf_state_dict.get(LM_HEAD), hf_state_dict[HF + "embed_tokens.weight"]
    return head is None or head.data_ptr() == emb.data_ptr()


def stage_layers(num_layers: int, pp: int = 1, pp_rank: int = 0, vpp: int | None = None,
                 vp_stage: int | None = None) -> range:
    """The global layers of pipeline rank `pp_rank`'s virtual stage `vp_stage`: megatron's even split
    (`get_transformer_layer_offset` / `get_num_layers_to_build` without uneven first/last stages), which
    model.py's Decoder checks against the layers megatron builds."""
    chunks = pp * (vpp or 1)
    if pp < 1 or num_layers % chunks or not 0 <= pp_rank < pp or not 0 <= (vp_stage or 0) < (vpp or 1):
        raise ValueError(f"num_hidden_layers={num_layers} must split evenly into pp={pp} x vpp={vpp} stages "
                         f"(pp_rank={pp_rank}, vp_stage={vp_stage})")
    n = num_layers // chunks
    j = (vp_stage or 0) * pp + pp_rank
    return range(j * n, (j + 1) * n)


def sparse_layers(hf_text_config) -> list[bool]:
    """Which decoder layers HF builds as MoE blocks (Qwen3VLMoeTextDecoderLayer): not in `mlp_only_layers`, and
    (i + 1) a multiple of `decoder_sparse_step`; all False for a dense model."""
    cfg = hf_text_config
    E, step = getattr(cfg, "num_experts", 0) or 0, getattr(cfg, "decoder_sparse_step", 1) or 1
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    return [E > 0 and i not in dense and (i + 1) % step == 0 for i in range(cfg.num_hidden_layers)]


def _experts(hf_text_config, ep: int) -> int:
    """Experts an EP rank holds."""
    E = getattr(hf_text_config, "num_experts", 0) or 0
    if ep < 1 or (E and E % ep) or (not E and ep != 1):
        raise ValueError(f"expert-parallel size {ep} must divide num_experts={E}")
    return E // ep


def hf_to_mcore(hf_state_dict: dict, hf_text_config, tp: int, rank: int, tied: bool | None = None, pp: int = 1,
                pp_rank: int = 0, vpp: int | None = None, vp_stage: int | None = None, ep: int = 1,
                ep_rank: int = 0) -> dict:
    """The megatron state dict of TP rank `rank` of `tp` from an HF state dict (other keys, e.g. the ViT's, are
    ignored). `tied`: None = `is_tied(hf_state_dict)`; tied checkpoints get no output_layer.weight (but the tied
    head's copy on a pipeline's last stage). With pp > 1: only (pp_rank, vp_stage)'s chunk (module docstring).
    MoE layers: EP rank `ep_rank` of `ep`'s experts, renumbered from 0."""
    from training.mcore.model import check

    check(hf_text_config, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is not in 0..{tp - 1}")
    n_local = _experts(hf_text_config, ep)
    if not 0 <= ep_rank < ep:
        raise ValueError(f"ep_rank {ep_rank} is not in 0..{ep - 1}")
    sparse = sparse_layers(hf_text_config)
    layers = stage_layers(hf_text_config.num_hidden_layers, pp, pp_rank, vpp, vp_stage)
    first, last = layers.start == 0, layers.stop == hf_text_config.num_hidden_layers
    hf = hf_state_dict
    tied = is_tied(hf) if tied is None else tied
    groups, _, _ = _groups(hf_text_config)
    vocab, padded = hf_text_config.vocab_size, padded_vocab_size(hf_text_config.vocab_size, tp)

    def vocab_rows(w):
        if w.shape[0] != vocab:
            raise ValueError(f"embedding/lm_head has {w.shape[0]} rows, the config's vocab_size is {vocab}")
        return _shard(torch.cat([w, w.new_zeros(padded - vocab, *w.shape[1:])]), tp, rank, 0)

    out = {}
    if first:
        out["embedding.word_embeddings.weight"] = vocab_rows(hf[HF + "embed_tokens.weight"])
    if last:
        out["decoder.final_layernorm.weight"] = _shard(hf[HF + "norm.weight"], tp, rank, None)
        if not tied or not first:
            out["output_layer.weight"] = vocab_rows(hf[HF + "embed_tokens.weight"] if tied else hf[LM_HEAD])
    for local, i in enumerate(layers):
        src, dst = f"{HF}layers.{i}.", f"decoder.layers.{local}."
        for hf_name, mc_name, dim in _PLAIN:
            if src + hf_name in hf:
                out[dst + mc_name] = _shard(hf[src + hf_name], tp, rank, dim)
        for kind in ("weight", "bias"):
            if src + f"self_attn.q_proj.{kind}" in hf:
                q, k, v = (hf[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
                out[dst + f"self_attention.linear_qkv.{kind}"] = _shard(_to_qkv(q, k, v, groups), tp, rank, 0)
        if sparse[i]:
            out[dst + "mlp.router.weight"] = hf[src + "mlp.gate.weight"].clone()
            gate_up, down = hf[src + "mlp.experts.gate_up_proj"], hf[src + "mlp.experts.down_proj"]
            for j in range(n_local):
                e = ep_rank * n_local + j
                out[dst + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = gate_up[e].clone()
                out[dst + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = down[e].clone()
            continue
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return out


def mcore_to_hf(shards: list[dict], hf_text_config) -> dict:
    """The HF state dict (model.language_model.* and lm_head.weight, exact HF names) from the megatron state dicts
    of all TP ranks, in rank order. Works for gradients keyed like the weights too (sum the q/k-norm gradients
    over TP first: `Decoder.reduce_tp_partial_grads`). Replicated tensors are taken from rank 0. MoE layers: the
    dicts hold all experts (ep=1; `merge_ep` the EP ranks' first)."""
    tp = len(shards)
    groups, per_group, hd = _groups(hf_text_config)
    vocab = hf_text_config.vocab_size

    def cat(key, dim):
        return torch.cat([s[key] for s in shards], dim=dim)

    emb = cat("embedding.word_embeddings.weight", 0)[:vocab].clone()
    out = {HF + "embed_tokens.weight": emb, HF + "norm.weight": shards[0]["decoder.final_layernorm.weight"].clone(),
           LM_HEAD: cat("output_layer.weight", 0)[:vocab].clone() if "output_layer.weight" in shards[0] else emb}
    for i in range(hf_text_config.num_hidden_layers):
        src, dst = f"decoder.layers.{i}.", f"{HF}layers.{i}."
        for hf_name, mc_name, dim in _PLAIN:
            if src + mc_name in shards[0]:
                out[dst + hf_name] = shards[0][src + mc_name].clone() if dim is None else cat(src + mc_name, dim)
        for kind in ("weight", "bias"):
            if src + f"self_attention.linear_qkv.{kind}" in shards[0]:
                q, k, v = _from_qkv(cat(src + f"self_attention.linear_qkv.{kind}", 0), groups, per_group, hd)
                out.update({dst + f"self_attn.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", (q, k, v))})
        if src + "mlp.router.weight" in shards[0]:
            out[dst + "mlp.gate.weight"] = shards[0][src + "mlp.router.weight"].clone()
            E = hf_text_config.num_experts
            experts = src + "mlp.experts.local_experts.{}.linear_fc{}.weight"
            if experts.format(E - 1, 1) not in shards[0]:
                raise ValueError(f"layer {i} does not hold all {E} experts: merge the EP ranks first (merge_ep)")
            out[dst + "mlp.experts.gate_up_proj"] = torch.stack([shards[0][experts.format(e, 1)] for e in range(E)])
            out[dst + "mlp.experts.down_proj"] = torch.stack([shards[0][experts.format(e, 2)] for e in range(E)])
            continue
        gate_up = [s[src + "mlp.linear_fc1.weight"].chunk(2) for s in shards]
        out[dst + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in gate_up])
        out[dst + "mlp.up_proj.weight"] = torch.cat([u for _, u in gate_up])
    return out


def reshard(shards: list[dict], hf_text_config, tp: int) -> list[dict]:
    """tp=len(shards) -> tp: through the HF layout (see the module docstring)."""
    hf = mcore_to_hf(shards, hf_text_config)
    tied = "output_layer.weight" not in shards[0]
    return [hf_to_mcore(hf, hf_text_config, tp, r, tied=tied) for r in range(tp)]


def _layer_key(key: str) -> tuple[int, str] | None:
    if not key.startswith("decoder.layers."):
        return None
    i, rest = key[len("decoder.layers."):].split(".", 1)
    return int(i), rest


def merge_pp(chunks: list[dict], hf_text_config, tied: bool) -> dict:
    """One TP rank's chunk state dicts in model order -> its pp=1 state dict: layers renumbered globally, the
    embedding from the first chunk, the final norm and head from the last (a tied head's copy dropped). Works for
    gradients too; the tied copy's gradient is the embedding's once pipeline.py `finalize_grads` summed them."""
    out, offset = {}, 0
    for c in chunks:
        n = 0
        for k, v in c.items():
            layer = _layer_key(k)
            if layer is not None:
                out[f"decoder.layers.{offset + layer[0]}.{layer[1]}"] = v
                n = max(n, layer[0] + 1)
            elif not (tied and k == "output_layer.weight"):
                out[k] = v
        offset += n
    if offset != hf_text_config.num_hidden_layers:
        raise ValueError(f"the chunks hold {offset} layers, the config has {hf_text_config.num_hidden_layers}")
    return out


def split_pp(state: dict, hf_text_config, pp: int, vpp: int | None = None) -> list[dict]:
    """One TP rank's pp=1 state dict -> its pp * vpp chunks in model order (tied: `state` has no output_layer;
    the last chunk gets a copy of the embedding when it is not the first)."""
    L, chunks = hf_text_config.num_hidden_layers, pp * (vpp or 1)
    n = len(stage_layers(L, pp, 0, vpp, None if vpp is None else 0))
    out = [{} for _ in range(chunks)]
    for k, v in state.items():
        layer = _layer_key(k)
        if layer is not None:
            out[layer[0] // n][f"decoder.layers.{layer[0] % n}.{layer[1]}"] = v
        else:
            out[0 if k.startswith("embedding.") else -1][k] = v
    if "output_layer.weight" not in state and chunks > 1:
        out[-1]["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    return out


def reshard_pp(shards: list[list[dict]], hf_text_config, tied: bool, tp: int, pp: int,
               vpp: int | None = None) -> list[list[dict]]:
    """shards[tp_rank][chunk] of any (tp, pp, vpp) layout -> the same at (tp, pp, vpp): merged over the pipeline,
    resharded over TP through the HF layout (`reshard`), split again."""
    merged = [merge_pp(chunks, hf_text_config, tied) for chunks in shards]
    return [split_pp(s, hf_text_config, pp, vpp) for s in reshard(merged, hf_text_config, tp)]


_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def merge_ep(ep_shards: list[dict], hf_text_config) -> dict:
    """One TP rank's state dicts of EP ranks 0..ep-1 -> its ep=1 dict: EP rank r's local expert j becomes expert
    r*E/ep + j (megatron's `local_expert_indices`), everything else (replicated over EP) from rank 0. Works for
    gradients too (reduce the replicated ones over the data-parallel group first)."""
    n_local = _experts(hf_text_config, len(ep_shards))
    out = {}
    for r, shard in enumerate(ep_shards):
        for k, v in shard.items():
            m = _EXPERT.match(k)
            if m is None:
                if r == 0:
                    out[k] = v
            elif int(m.group(2)) >= n_local:
                raise ValueError(f"EP rank {r} holds {k}, past its {n_local} local experts")
            else:
                out[f"{m.group(1)}{r * n_local + int(m.group(2))}{m.group(3)}"] = v
    return out


def split_ep(state: dict, hf_text_config, ep: int) -> list[dict]:
    """One TP rank's ep=1 dict -> its dicts of EP ranks 0..ep-1 (each its experts, renumbered from 0; the rest
    shared)."""
    n_local = _experts(hf_text_config, ep)
    out = [{} for _ in range(ep)]
    for k, v in state.items():
        m = _EXPERT.match(k)
        if m is None:
            for d in out:
                d[k] = v
        else:
            r, j = divmod(int(m.group(2)), n_local)
            out[r][f"{m.group(1)}{j}{m.group(3)}"] = v
    return out


def reshard_ep(shards: list[list[dict]], hf_text_config, tp: int, ep: int) -> list[list[dict]]:
    """shards[tp_rank][ep_rank] of any (tp, ep) layout -> the same at (tp, ep): merged over EP, resharded over TP
    (`reshard`), split again."""
    merged = [merge_ep(s, hf_text_config) for s in shards]
    return [split_ep(s, hf_text_config, ep) for s in reshard(merged, hf_text_config, tp)]
