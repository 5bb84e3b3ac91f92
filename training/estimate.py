"""Analytic per-rank memory estimate of one training step: `python -m training.memory estimate ...`.

Why: a 256K-token step of an 8B model either fits an 80 GB GPU or dies with an out-of-memory error after the
job waited in the queue and loaded its weights. The arithmetic is known (../shared/research/scale.md §1), so it
runs up front: `launch.pipeline` refuses a recipe step that cannot fit (naming the levers that would make it
fit), and the CLI prints the table for any shape and layout.

What is counted, per rank (GiB = 2**30 bytes; b = bytes of engine.dtype: bf16 2, fp32 4; W = world processes;
t = tokens per rank = micro_batch_size x seq_len / sp_size; RL below):
- parameters: all of them x b (a MoE model: every expert, not the k a token runs); ZeRO-3 partitions them over W
  (the project passes no mpu to DeepSpeed, so ZeRO's data-parallel group is the whole world even under SP);
  ZeRO-1/2 keep full copies; engine.offload_params: host.
- gradients: trained groups only, x b (a MoE model's `llm` is its leaf groups dense, router and experts; a stage
  may train some of them); ZeRO-2/3 partition them over W and add one reduce bucket (DeepSpeed's
  reduce_bucket_size, 5e8 elements, or the largest trained tensor if larger: lm_head, or a MoE layer's
  gate_up_proj [E, 2I, hidden]); with optimizer offload (ZeRO-2/3) the partition lives in host memory as fp32.
- optimizer states: fp32 master + Adam m, v = 12 B per trained parameter (8 B: fp32 without ZeRO), over W for
  ZeRO >= 1; on the host with engine.offload_optimizer.
- ZeRO-3 working set: the largest module gathered whole plus DeepSpeed's prefetch bucket
  (stage3_prefetch_bucket_size, 5e7 elements), x b: the embedding or lm_head (V x hidden), or on a MoE model one
  whole MoE block if larger (the project registers the sparse block as a ZeRO-3 leaf module, so all its experts
  are gathered at once: E x (1 + 3 x I) x hidden with the router), the teacher's if larger (distill); its
  defaults (max_live_parameters 1e9) are assumed and small parameters kept persistent are ignored.
- decoder activations, a SwiGLU GQA decoder under a flash/varlen attention (no L x L tensor). Saved per token
  and layer, as autograd keeps them: each RMSNorm its input in fp32 (HF's upcast: 4 B), the normalized tensor and
  its output (b each; Qwen3's q/k norms the first two over q and k); the attention's RoPE'd q and k, v, its
  output and fp32 log-sum-exp (4 B per head); the MLP's gate, up, act(gate), act*up (4 x intermediate, divided
  by model.tiled_mlp's N); RoPE, the residual adds and the projections' outputs keep nothing more. Under SP the
  attention keeps its q, k, v, out after the all-to-all instead (2 q + 2 max(kv_heads, sp) x head_dim per local
  token: KV heads are replicated up to sp) plus o_proj's input. With model.gradient_checkpointing the stored
  part is layers x t x hidden x b (the layer inputs) and one layer is recomputed in backward (that layer's
  figure plus its backward gradients: 2 x intermediate / N, 2 x hidden, q + 2 kv); without it the stored part
  is layers x the per-layer figure. model.offload_activations moves the stored part to host memory (torch's
  save_on_cpu; the recomputed layer stays on the device).
- MoE layers (Qwen3-VL-MoE: the layers off mlp_only_layers and on decoder_sparse_step; E experts of
  moe_intermediate I, k per token): the sparse block replaces the dense MLP's figure. Per token the router keeps
  its fp32 softmax over E (4 E), the top-k indices (int64) and fp32 weights with their sum (12 k + 4); each token
  is routed k times, and per routed copy HF's default experts path (grouped_mm) keeps the gathered input row (H),
  the gate_up output (2I; SiLU's gate and the product's up are views of it), act(gate) and act*up (I each), the
  down output (H, for the routing-weight product), the copy's weight (b) and 3 int64 indices (24 B); the weighted
  output is not kept (its reordering and the k-sum keep nothing). HF's eager per-expert loop keeps one H more per
  copy (index_add_ keeps its source). Gradients of the layer in backward: 4 E + k x (2I + 2H) x b per token. With
  checkpointing the stored part is the layer inputs as above and the recomputed layer is the larger kind; without
  it, each kind's layers x its figure. TiledMLP does not run the sparse block (no tiled_mlp lever for MoE).
- Ulysses buffers (sp > 1): q, k, v, out of one layer on the FULL sequence with heads/sp heads, x 2 for the
  all-to-all's send and receive copies: 2 x t x (2 q + 2 max(kv_heads, sp) x head_dim) x b.
- ViT: `visual_fraction` (default 0.5, an assumption about the data) of the row's tokens are visual; each
  merged token is merge^2 = 4 patches. Per rank: the row's patches / sp under parallel.sp_vision=split, all of
  them under replicate. Per patch and block: norms (LayerNorm, Qwen2/3: input and output; RMSNorm, Qwen2.5: as
  in the decoder), the attention's RoPE'd q and k, the fused qkv output (v is a view of it), its output and a
  reshaped copy, the MLP (Qwen2.5: SwiGLU, 4 x intermediate; Qwen2: fc1 and quick GELU, 3 x; Qwen3: GELU,
  2 x). A trained ViT stores depth x patches x hidden x b with checkpointing (depth x the per-block figure
  without) plus one block recomputed; a frozen ViT stores nothing (its inputs need no gradient) and only one
  block's forward tensors exist at a time. The merger(s) (Qwen3: 1 + DeepStack) store 4 x merge^2 x hidden + out
  per merged token when trained. Also the whole row's pixel values (fp32 from the processor; every rank of an SP
  group receives the whole micro-batch) plus this rank's cast copy, and the merged features of the whole row
  (x (1 + DeepStack layers); x 2 under SP: the gathered rows and their reordering).
- loss: one chunk of fp32 logits with its log-softmax and gradient, ~3 x chunk x V x 4 B (chunk = model.loss_chunk
  or 2**28 // (4 V), ~256 MiB of logits); the supervised hidden states gathered for lm_head (t x hidden x b, every
  token supervised: an upper bound). The lm objective outside ZeRO-3 runs the fused path (training/vlm.py
  _FusedLinear): + grad_h (t x hidden x b) and, with lm_head trained (llm; MoE: dense), its fp32 gradient
  (V x hidden x 4 B).
  ZeRO-3, DPO and RL recompute the chunk in backward instead.
- reference model (dpo; sapo with kl_beta > 0): the frozen starting weights, placed like the parameters.
- teacher (distill): its weights placed like the parameters; its supervised hidden states (t x its hidden x b) and
  one chunk of its fp32 logits at the loss; on-policy steps (lmbda > 0) count their rollouts like RL's.
- RL (sapo, no SP): a rollout takes `mini_batches` steps' prompts (mini_batches x grad_accum x micro_batch_size
  rows of seq_len prompt tokens, stages/sapo.py's steady state), G = num_generations completions each; with a
  mean prompt of `prompt_len` tokens (an assumption, default 1024) that is G x prompt tokens x (1 + max_new_tokens
  / prompt_len) rollout tokens. Generation holds their KV cache (2 x layers x kv_heads x head_dim x b per token)
  and runs the prefill of one layer over all prompt copies at once; the rollouts are then trained in
  mini_batches x grad_accum micro-batches, so a training micro-batch has G x micro_batch_size x seq_len x
  (1 + max_new_tokens / prompt_len) tokens, which replace micro_batch_size x seq_len in t above.
- allowance: 2 GiB (CUDA context, NCCL buffers, kernels' workspaces) + 5% of the peak (allocator fragmentation).
- host memory: what the offload levers move there must fit `host_gib` per rank too (default 128: a 1 TiB node
  shared by 8 GPUs), so that a lever is not "make it fit" by parking terabytes of activations on the host.

The peak is what lives all step (model state, what the ViT stores for its backward, the pixels) plus the largest
of the phases that never coexist: the ViT's (one block in backward, the gathered visual features), the decoder's
(its stored activations, the layer in backward, Ulysses buffers, the loss) and RL generation's.

engine=megatron (training/engines/megatron.py; Plan.engine, tp, pp, vpp, ep, sequence_parallel,
distributed_optimizer; ZeRO, SP, tiled MLP and the offload of parameters and optimizer do not apply). A rank is one
(TP rank, pipeline stage) of a replica; dp = W / (tp x pp). With pp > 1 the estimate is the larger of the first
stage (ViT, embedding, the most micro-batches in flight) and the last (head, loss); the stages between hold less
than the first.
- parameters (`mcore_params`, convert.py's shards): the ViT and merger whole on every rank (replicated over TP; each
  stage keeps a copy, only the first runs it); of the decoder layers / pp layers, their attention and MLP matrices
  and qkv biases / tp, norms whole; the first stage the embedding, the last the final norm and head, each V' / tp
  rows (V' = V padded to a multiple of 128 x tp); tied: no head at pp 1, a copy on the last stage otherwise; a MoE
  layer its router whole and E / ep experts (tp 1, pp 1). x b.
- gradients: megatron DDP's contiguous buffers over every trained parameter of the rank, fp32 (grad_reduce_in_fp32):
  4 B each. The ViT's copies on later stages are in the optimizer groups, so they have buffers (and optimizer state)
  too, though they never get a gradient: counted.
- optimizer states: Adam m, v and, for bf16, fp32 master weights (12 B; fp32: 8 B) per trained parameter of the
  rank, / dp with engine.distributed_optimizer (the experts' / (dp / ep), their expert-data-parallel group).
- reference model and teacher: split like the policy (the rank's shards), x b.
- decoder activations (`mcore_layer_bytes`, measured on the tiny models): what megatron-core's local spec keeps per
  layer, with its attention heads (h / tp), query groups and MLP width / tp per rank. Its core attention is
  training/mcore/model.py's SegmentAttention: a packed row (cu_seqlens: every lm, DPO and distill micro-batch) runs
  training/attention.py's sdpa_varlen, SDPA causally per segment with no mask, which on a GPU takes a fused kernel
  (flash, or cuDNN's where torch prefers it) keeping q, k, v (the rank's groups: SDPA's enable_gqa repeats nothing),
  its output and an fp32 log-sum-exp per head, as the DeepSpeed path's layers do, plus o_proj's input (the segments'
  outputs put back in sequence order: a copy); no scores, no mask. Padded rows (RL rollouts of span = prompt_len +
  max_new_tokens positions) run SDPA with the [B, 1, span, span] bool mask, which CUDA's flash kernel (no mask) and
  memory-efficient kernel (no GQA) refuse: counted as SDPA's math kernel (an upper bound where cuDNN takes the call:
  H100/B200 with cuDNN > 9.15), fp32 scaled q, k and v repeated to the rank's heads, the fp32 softmax over span keys
  per head, o_proj's input; plus the bool mask of tokens x span per forward pass. With model.gradient_checkpointing
  the decoder recomputes every layer in backward (Decoder.recompute, torch.utils.checkpoint per layer): the stored
  part is layers x tokens x hidden x b per forward pass (the layer inputs; / tp under sequence parallelism, the
  layer input being the rank's slice of the sequence) and one layer is recomputed in backward (its figure plus its
  gradients), as on the DeepSpeed path; without it every layer's figure is stored and engine.sequence_parallel
  divides the norms' part (all that lives outside the TP regions) by tp. A pipeline rank holds `in_flight` forward
  passes of layers / (pp x vpp) layers each: megatron's 1F1B warm-up + 1, min(pp - stage, micro-batches) (vpp 1),
  else min(2 (pp - stage - 1) + (vpp - 1) pp + 1, micro-batches x vpp) (the interleaved schedule's); micro-batches
  = trainer.grad_accum. Their outputs (megatron keeps them: deallocate_pipeline_outputs off) are the pipeline
  buffers, x (1 + the DeepStack features carried past the first chunk). model.offload_activations moves the stored
  part to the host at pp 1 and on the last stage only (a first stage runs its forward outside the loss's
  save_on_cpu).
- ViT (first stage): as above (every TP rank encodes the same images, whole), its stored activations and pixel
  values once per micro-batch in flight there (min(micro-batches, ceil(in_flight / vpp))).
- loss (last stage): lm: megatron's vocabulary-parallel cross-entropy, one chunk of this rank's V' / tp logits
  (3 x chunk x V'/tp x 4 B) + hidden and grad_h + the head shard's fp32 gradient; other objectives gather a chunk's
  [chunk, V] logits on each TP rank (+ chunk x V' x b) and recompute it in backward, as under ZeRO-3.
- RL / on-policy rollouts (pp 1): generation runs the HF decoder with the gathered weights, so the rank keeps the
  whole HF decoder (LLM x b, on the device after the first rollout) and, during a rollout, the gathered copy.

What it ignores: the data loader's host memory; RL's padding of rollout rows to the longest prompt and its no-grad
log-prob passes; DeepSpeed's communication buffers beyond the reduce/prefetch buckets;
temporary tensors of a single op (an all-gather's output is counted, a matmul's workspace is not); attention
kernels' own workspaces; the exact split of images between SP ranks (balanced by token count, as training/sp.py
does); the DeepStack features a decoder slice adds. It is an estimate: a plan at 95% of the device is a risk, not
a promise. What is checked (tests/test_memory_estimate.py): the parameter counts equal the HF models' (8B, 7B,
30B-A3B, 72B and the tiny presets, MoE included), and the per-layer and per-block figures equal the bytes autograd
keeps on the tiny models in fp32 and bf16 (CPU's flash SDPA kernel keeps what flash-attention does; the MoE layer
under both experts paths); engine=megatron: the per-rank decoder parameters equal convert.py's shards (tp 2, pp 2),
and the megatron layer's figure what autograd keeps, on packed rows of one and of many segments and on padded rows
under SDPA's math kernel (CPU's composite RMSNorm keeps fp32 copies that CUDA's fused kernel, assumed here, does
not; the test adds them), and with recompute the layer inputs alone. Not modelled there: an uneven MoE routing
(balanced over the EP ranks assumed), megatron's p2p receive buffers, the bf16 gradient a parameter holds before DDP
adds it to the buffer, sdpa_varlen's padding of a length class's segments to its longest (q, k, v, out and
log-sum-exp of the padding: < 2x the attention's tensors, none when a class's segments have one length) and its
reordering index when a row has several classes (8 B per token), engine.dtype=fp32 on a GPU (no fused kernel:
SDPA's math kernel keeps the scores).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

GiB = 2 ** 30
REDUCE_BUCKET = 5e8  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
PREFETCH_BUCKET = 5e7  # DeepSpeed stage3_prefetch_bucket_size default (elements)
ALLOWANCE_GIB, ALLOWANCE_FRACTION = 2.0, 0.05
VISUAL_FRACTION = 0.5
PROMPT_LEN = 1024  # RL: assumed mean prompt tokens
HOST_GIB = 128.0  # host memory per rank for offloaded state: a 1 TiB node shared by 8 GPUs
CHUNK_BYTES = 2 ** 28  # training/vlm.py CHUNK_BYTES: fp32 logits of one loss chunk when model.loss_chunk=0
GROUPS = ("vision", "merger", "llm")
SUBGROUPS = {"llm": ("dense", "router", "experts")}  # training/models.py SUBGROUPS: a MoE llm's leaf groups


# ---------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class TextShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding
    qkv_bias: bool = False  # Qwen2 / Qwen2.5: q, k, v projections have biases
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    # MoE (Qwen3-VL-MoE): `sparse_layers` of the layers replace the dense MLP by a sparse MoE block: a router
    # [experts, hidden] and `experts` SwiGLU experts of `moe_intermediate`, `top_k` of them per token
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    sparse_layers: int = 0

    def layer_params(self) -> int:
        """A dense layer: attention, norms and the dense MLP."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        return attn + 2 * self.head_dim * self.qk_norm + 3 * h * self.intermediate + 2 * h

    def router_params(self) -> int:
        """One sparse layer's router (mlp.gate, [E, H])."""
        return self.experts * self.hidden

    def expert_params(self) -> int:
        """One sparse layer's experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
        return 3 * self.experts * self.moe_intermediate * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden
        sparse = self.sparse_layers * (self.router_params() + self.expert_params() - 3 * self.hidden * self.intermediate)
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + sparse + self.hidden


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    out_hidden: int  # the merger's output = the decoder's hidden size
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3
    gated_mlp: bool = False  # Qwen2.5: SwiGLU gate/up/down; Qwen2/3: fc1, act, fc2
    quick_gelu: bool = False  # Qwen2-VL: x * sigmoid(1.702 x) keeps one more intermediate than GELU
    layer_norm: bool = True  # LayerNorm with bias (Qwen2/3); False: RMSNorm (Qwen2.5)
    patch_bias: bool = False  # Qwen3's patch embedding has a bias
    pos_embeddings: int = 0  # Qwen3: learned position table rows
    deepstack: int = 0  # Qwen3: DeepStack mergers (features injected into the first decoder layers)

    @property
    def pixels_per_patch(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch ** 2

    def block_params(self) -> int:
        h, i = self.hidden, self.intermediate
        mlp = 3 * h * i + 2 * i + h if self.gated_mlp else 2 * h * i + i + h
        return 2 * h * (2 if self.layer_norm else 1) + 3 * h * h + 3 * h + h * h + h + mlp

    def vision_params(self) -> int:
        """Patch embedding, position table, blocks (the `vision` group)."""
        patch = self.pixels_per_patch * self.hidden + self.hidden * self.patch_bias
        return patch + self.pos_embeddings * self.hidden + self.depth * self.block_params()

    def merger_params(self) -> int:
        """The merger and the DeepStack mergers (the `merger` group)."""
        n = self.hidden * self.merge ** 2
        mlp = n * n + n + n * self.out_hidden + self.out_hidden
        main = self.hidden * (2 if self.layer_norm else 1) + mlp  # norm over hidden, before the 2x2 shuffle
        return main + self.deepstack * (2 * n + mlp)  # DeepStack mergers: LayerNorm after the shuffle


@dataclass(frozen=True)
class Shapes:
    family: str  # training.models FAMILIES key
    text: TextShape
    vision: VisionShape

    def params(self) -> dict:
        """Parameter count per leaf group (training/models.py: vision, merger, llm; a MoE llm is dense, router and
        experts)."""
        t = self.text
        out = {"vision": self.vision.vision_params(), "merger": self.vision.merger_params()}
        if not t.experts:
            return {**out, "llm": t.params()}
        router, experts = t.sparse_layers * t.router_params(), t.sparse_layers * t.expert_params()
        return {**out, "dense": t.params() - router - experts, "router": router, "experts": experts}

    def leaves(self, groups) -> tuple:
        """The leaf groups that stage group names stand for (`llm` on a MoE model: dense, router and experts)."""
        counts, out = self.params(), []
        names = {**{g: (g,) for g in counts}, **{g: ls for g, ls in SUBGROUPS.items() if set(ls) <= set(counts)}}
        for g in groups:
            if g not in names:
                raise ValueError(f"trainable group {g!r} is not a group of this {self.family} model; its groups: "
                                 f"{sorted(names)}")
            out += [leaf for leaf in names[g] if leaf not in out]
        return tuple(out)

    @property
    def head_group(self) -> str:
        """The leaf group that holds lm_head."""
        return "dense" if self.text.experts else "llm"


PRESETS: dict[str, Shapes] = {
    # Qwen3-VL-8B: the Qwen3-8B decoder (config.json of Qwen/Qwen3-VL-8B-Instruct); its ViT is transformers'
    # Qwen3VLVisionConfig default except out_hidden_size
    "qwen3_vl_8b": Shapes("qwen3_vl", TextShape(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128,
                                                intermediate=12288, vocab=151936, qk_norm=True),
                          VisionShape(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16, out_hidden=4096,
                                      patch_bias=True, pos_embeddings=2304, deepstack=3)),
    # Qwen3-VL-32B: the Qwen3-32B decoder, the 8B's ViT with out_hidden_size 5120 (a distillation teacher for 8B)
    "qwen3_vl_32b": Shapes("qwen3_vl", TextShape(hidden=5120, layers=64, heads=64, kv_heads=8, head_dim=128,
                                                 intermediate=25600, vocab=151936, qk_norm=True),
                           VisionShape(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16, out_hidden=5120,
                                       patch_bias=True, pos_embeddings=2304, deepstack=3)),
    # Qwen2.5-VL-7B (config.json of Qwen/Qwen2.5-VL-7B-Instruct; transformers' defaults are the 72B text shapes)
    "qwen2_5_vl_7b": Shapes("qwen2_5_vl", TextShape(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                                                    intermediate=18944, vocab=152064, qkv_bias=True),
                            VisionShape(depth=32, hidden=1280, intermediate=3420, heads=16, patch=14,
                                        out_hidden=3584, gated_mlp=True, layer_norm=False)),
    # Qwen2.5-VL-72B (Qwen/Qwen2.5-VL-72B-Instruct: the Qwen2.5-72B decoder, untied; its ViT the 7B's with a
    # 3456-wide MLP and out_hidden_size 8192)
    "qwen2_5_vl_72b": Shapes("qwen2_5_vl", TextShape(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
                                                     intermediate=29568, vocab=152064, qkv_bias=True),
                             VisionShape(depth=32, hidden=1280, intermediate=3456, heads=16, patch=14,
                                         out_hidden=8192, gated_mlp=True, layer_norm=False)),
    # Qwen2-VL-7B (Qwen/Qwen2-VL-7B-Instruct: the same decoder as Qwen2.5-VL-7B; ViT embed_dim 1280, mlp_ratio 4)
    "qwen2_vl_7b": Shapes("qwen2_vl", TextShape(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                                                intermediate=18944, vocab=152064, qkv_bias=True),
                          VisionShape(depth=32, hidden=1280, intermediate=5120, heads=16, patch=14, out_hidden=3584,
                                      quick_gelu=True)),
    # Qwen3-VL-30B-A3B / 235B-A22B (config.json of Qwen/Qwen3-VL-30B-A3B-Instruct / -235B-A22B-Instruct, as
    # pytorch/torchtitan torchtitan/experiments/qwen3_vl/__init__.py "30B-A3B" / "235B-A22B" spell them): every
    # one of the layers sparse (decoder_sparse_step 1, mlp_only_layers []), 128 experts, top-8, untied lm_head;
    # the 8B's ViT with out_hidden_size = the decoder's hidden. intermediate_size (6144 / 12288) is the config's
    # dense-MLP width, unused with no mlp_only_layers. 30B-A3B: 31,070,754,032 parameters, the checkpoint's count
    "qwen3_vl_30b_a3b": Shapes("qwen3_vl_moe",
                               TextShape(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=6144,
                                         vocab=151936, qk_norm=True, experts=128, top_k=8, moe_intermediate=768,
                                         sparse_layers=48),
                               VisionShape(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16,
                                           out_hidden=2048, patch_bias=True, pos_embeddings=2304, deepstack=3)),
    "qwen3_vl_235b_a22b": Shapes("qwen3_vl_moe",
                                 TextShape(hidden=4096, layers=94, heads=64, kv_heads=4, head_dim=128,
                                           intermediate=12288, vocab=151936, qk_norm=True, experts=128, top_k=8,
                                           moe_intermediate=1536, sparse_layers=94),
                                 VisionShape(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16,
                                             out_hidden=4096, patch_bias=True, pos_embeddings=2304, deepstack=3)),
}


def from_hf(cfg) -> Shapes:
    """Shapes of a transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE config object (text_config,
    vision_config)."""
    family = cfg.model_type
    if family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(f"model_type {family!r} is not a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE config")
    t, v = cfg.text_config, cfg.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    qwen3 = family in ("qwen3_vl", "qwen3_vl_moe")
    bias = bool(getattr(t, "attention_bias", False))
    moe = {}
    if family == "qwen3_vl_moe" and t.num_experts > 0:  # HF's Qwen3VLMoeTextDecoderLayer: which MLPs are sparse
        sparse = sum(i not in t.mlp_only_layers and (i + 1) % t.decoder_sparse_step == 0
                     for i in range(t.num_hidden_layers))
        moe = dict(experts=t.num_experts, top_k=t.num_experts_per_tok, moe_intermediate=t.moe_intermediate_size,
                   sparse_layers=sparse)
    text = TextShape(hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                     kv_heads=t.num_key_value_heads, head_dim=head_dim, intermediate=t.intermediate_size,
                     vocab=t.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                     qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False, qk_norm=qwen3, **moe)
    if family == "qwen2_vl":
        vision = VisionShape(depth=v.depth, hidden=v.embed_dim, intermediate=int(v.embed_dim * v.mlp_ratio),
                             heads=v.num_heads, patch=v.patch_size, out_hidden=v.hidden_size,
                             temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size,
                             in_channels=v.in_channels, quick_gelu=v.hidden_act == "quick_gelu")
    else:
        vision = VisionShape(depth=v.depth, hidden=v.hidden_size, intermediate=v.intermediate_size,
                             heads=v.num_heads, patch=v.patch_size, out_hidden=v.out_hidden_size,
                             temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size,
                             in_channels=v.in_channels, gated_mlp=not qwen3, layer_norm=qwen3, patch_bias=qwen3,
                             pos_embeddings=v.num_position_embeddings if qwen3 else 0,
                             deepstack=len(v.deepstack_visual_indexes) if qwen3 else 0)
    return Shapes(family, text, vision)


def from_config_json(path) -> Shapes:
    """Shapes of an HF checkpoint's config.json (a file or its directory), read through the family's config class
    so that keys the file leaves out take transformers' defaults, as the model built from it would."""
    from training.models import FAMILIES

    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    family = next((f for f in FAMILIES.values() if f.model_type == data.get("model_type")), None)
    if family is None:
        raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not one of "
                         f"{[f.model_type for f in FAMILIES.values()]}")
    return from_hf(family.config_cls.from_dict(data))


def tiny(family: str, changes: Optional[dict] = None) -> Shapes:
    """The tiny preset of training/models.py (model=tiny_<family>, with model.tiny's `changes`), its vocabulary
    that of the tiny tokenizer."""
    return _tiny(family, json.dumps(changes or {}, sort_keys=True))


@lru_cache(maxsize=None)
def _tiny(family: str, changes: str) -> Shapes:
    from training import models

    fam = models.get_family(family)
    return from_hf(models.tiny_config(fam, models.tiny_tokenizer(fam), json.loads(changes)))


def shapes_of(name: str) -> Shapes:
    """A preset name, tiny_<family>, or an HF config.json (file or directory)."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("tiny_") and name[5:] in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return tiny(name[5:])
    if Path(name).exists():
        return from_config_json(name)
    raise ValueError(f"model shapes {name!r}: not a preset ({sorted(PRESETS)}), tiny_<family> or a config.json path")


# ---------------------------------------------------------------- the plan and its estimate


@dataclass(frozen=True)
class Plan:
    """What decides one rank's memory: the model, the row, the layout and the levers."""

    shapes: Shapes
    seq_len: int
    world: int = 1
    micro_batch_size: int = 1
    sp_size: int = 1
    sp_vision: str = "split"
    zero_stage: int = 3
    dtype: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool = True
    offload_activations: bool = False
    tiled_mlp: int = 0
    trainable: tuple = GROUPS
    objective: str = "lm"  # lm: fused loss outside ZeRO-3; dpo / sapo: log-probs recomputed per chunk
    reference: bool = False  # a frozen copy of the starting weights (dpo; sapo with kl_beta > 0)
    teacher: Optional["Shapes"] = None  # distill: the frozen teacher's shapes (placed like the parameters)
    sp_allowed: bool = True  # False: the objective cannot run sequence-parallel (sapo): no sp lever
    loss_chunk: int = 0
    visual_fraction: float = VISUAL_FRACTION
    grad_accum: int = 1
    rollouts: int = 0  # RL: completions per prompt (stage.objective.num_generations); 0: not an RL stage
    max_new_tokens: int = 0
    mini_batches: int = 1
    prompt_len: int = PROMPT_LEN  # RL: assumed mean prompt length (how many prompts a row of seq_len holds)
    # engine=megatron (training/engines/megatron.py, conf/engine/megatron.yaml): the decoder's layout; "deepspeed"
    # reads none of these, "megatron" none of zero_stage, sp_size, tiled_mlp, offload_optimizer, offload_params
    engine: str = "deepspeed"  # deepspeed | megatron
    tp: int = 1  # tensor-parallel ranks of a replica
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages per pipeline rank (interleaved 1F1B)
    ep: int = 1  # MoE: data-parallel ranks that split the experts
    sequence_parallel: bool = False  # tp > 1: the activations outside the TP regions split over the TP ranks
    distributed_optimizer: bool = True  # optimizer state split over the data-parallel ranks
    pp_allowed: bool = True  # False: the objective cannot run on a pipeline (Objective.no_pipeline): no pp lever
    stage: Optional[int] = None  # pp > 1: the pipeline stage estimated; None: the first or the last, the larger

    @property
    def megatron(self) -> bool:
        return self.engine == "megatron"

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the world (DeepSpeed), world / (tp x pp) (megatron)."""
        return self.world // (self.tp * self.pp) if self.megatron else self.world

    @property
    def tokens(self) -> int:
        """Tokens of one training micro-batch (before the SP split). RL: each prompt token becomes G rollout
        tokens plus G x max_new_tokens per prompt of completion (training/estimate.py docstring)."""
        if not self.rollouts:
            return self.micro_batch_size * self.seq_len
        return math.ceil(self.rollouts * self.micro_batch_size * self.seq_len
                         * (1 + self.max_new_tokens / self.prompt_len))


# alive all step long; during the ViT's forward/backward; during the decoder's; during RL generation
PHASES = ("step", "vit", "decoder", "rollout")


@dataclass
class Part:
    name: str
    device: float  # bytes
    host: float  # bytes
    note: str
    phase: str = "step"


@dataclass
class Estimate:
    plan: Plan
    parts: list = field(default_factory=list)
    stage: int = 0  # engine=megatron, pp > 1: the pipeline stage the parts are of

    def phase_gib(self, phase: str) -> float:
        return sum(p.device for p in self.parts if p.phase == phase) / GiB

    @property
    def device_gib(self) -> float:
        """The peak: what lives all step plus the largest of the other phases (they never coexist)."""
        return self.phase_gib("step") + max(self.phase_gib(p) for p in PHASES[1:])

    @property
    def host_gib(self) -> float:
        return sum(p.host for p in self.parts) / GiB

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def to_dict(self) -> dict:
        return {"device_gib": self.device_gib, "host_gib": self.host_gib, "stage": self.stage,
                "parts": [{"name": p.name, "phase": p.phase, "device_gib": p.device / GiB, "host_gib": p.host / GiB,
                           "note": p.note} for p in self.parts]}


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def layer_bytes(t: TextShape, b: int, sp: int, tiled: int, sparse: bool = False) -> tuple[float, float]:
    """(bytes saved for backward per token by one decoder layer, its backward gradients per token). What autograd
    keeps (tests/test_memory_estimate.py measures it): an RMSNorm its input in fp32 (HF upcasts), the normalized
    tensor and the 1/rms, and its output where a linear consumes it; RoPE and the residual adds keep nothing.
    `sparse`: a MoE layer, its MLP the sparse block of `moe_bytes` (not tiled: TiledMLP does not run it)."""
    h, hd, n = t.hidden, t.head_dim, max(1, tiled)
    q, kv = t.heads * hd, t.kv_heads * hd
    norms = 2 * (4 * h + 2 * b * h + 4)
    qk_norm = ((4 + b) * (q + kv) + 4 * (t.heads + t.kv_heads)) if t.qk_norm else 0
    if sp > 1:  # the kernel's q, k, v, out after the all-to-all (heads/sp of the full sequence), o_proj's input
        attn = b * (2 * q + 2 * max(t.kv_heads, sp) * hd + q) + 4 * t.heads
    else:  # RoPE'd q and k, v, the output (o_proj's input), the fp32 log-sum-exp per head
        attn = b * (2 * q + 2 * kv) + 4 * t.heads
    if sparse:
        mlp, mlp_grads = moe_bytes(t, b)
    else:
        mlp, mlp_grads = b * 4 * t.intermediate / n, b * 2 * t.intermediate / n  # gate, up, act(gate), act(gate) * up
    return norms + qk_norm + attn + mlp, mlp_grads + b * (2 * h + q + 2 * kv)


def moe_bytes(t: TextShape, b: int, eager: bool = False) -> tuple[float, float]:
    """(bytes saved per token by one sparse MoE block, its MLP gradients per token in backward). The router keeps
    its fp32 softmax over the E experts, the top-k indices (int64), the fp32 top-k weights and their sum (the
    renormalisation). Each token is routed to k experts; per routed copy transformers' default experts path
    (grouped_mm, integrations/moe.py) keeps the gathered input row (H), the gate_up output (2I: SiLU's gate and the
    product's up are views of it), act(gate) and act(gate) * up (I each, the latter down_proj's input), the down
    output (H, for the routing-weight product), the copy's routing weight (b) and 3 int64 indices (the sort's
    permutation, its // k row index, the inverse permutation). `eager` (experts_implementation="eager", the
    per-expert loop of Qwen3VLMoeTextExperts.forward): index_add_ also keeps its source, the weighted output (one
    more H), and torch.where's 2 indices share one storage (16 B). Gradients: the router's fp32 softmax, per copy
    those of the gate_up output and of the down output and gathered row."""
    E, k, h, i = t.experts, t.top_k, t.hidden, t.moe_intermediate
    router = 4 * E + 8 * k + 4 * k + 4
    copy = b * ((3 if eager else 2) * h + 4 * i + 1) + (16 if eager else 24)
    return router + k * copy, 4 * E + k * b * (2 * i + 2 * h)


def decoder_layers(t: TextShape, b: int, sp: int, tiled: int) -> list[tuple[str, int, float, float]]:
    """[(kind, its layers, bytes saved per token, backward gradients per token)] of the dense and sparse layers."""
    kinds = [("", t.layers - t.sparse_layers, *layer_bytes(t, b, sp, tiled)),
             ("MoE ", t.sparse_layers, *layer_bytes(t, b, sp, tiled, sparse=True))]
    return [k for k in kinds if k[1]]


def block_bytes(v: VisionShape, b: int) -> tuple[float, float]:
    """(bytes saved per patch by one ViT block, its backward gradients per patch), as `layer_bytes` counts them:
    norms (LayerNorm: input, output, fp32 mean and 1/std; RMSNorm as in the decoder); the attention's RoPE'd q
    and k, the fused qkv output (v is a view of it), the output and its reshaped copy, the log-sum-exp; the MLP's
    intermediates (SwiGLU 4, quick GELU 3, GELU 2)."""
    h = v.hidden
    norms = 2 * (2 * b * h + 8) if v.layer_norm else 2 * (4 * h + 2 * b * h + 4)
    attn = 7 * b * h + 4 * v.heads
    mlp = b * (4 if v.gated_mlp else 3 if v.quick_gelu else 2) * v.intermediate
    return norms + attn + mlp, b * (2 * v.intermediate + 5 * h)


def _largest_module(t: TextShape) -> tuple[int, str]:
    """(parameters, what) of the largest module ZeRO-3 gathers whole: the embedding / lm_head, or a MoE block (a
    ZeRO-3 leaf module: all its experts at once)."""
    block = (t.router_params() + t.expert_params()) * (t.sparse_layers > 0)
    if block > t.vocab * t.hidden:
        return block, "one MoE block, E x (1 + 3 x I) x hidden"
    return t.vocab * t.hidden, "V x hidden"


# ---------------------------------------------------------------- engine=megatron

VOCAB_DIVISIBLE_BY = 128  # training/mcore/convert.py: the vocabulary padded to a multiple of 128 x tp


def vocab_rows(vocab: int, tp: int) -> int:
    """Embedding (or head) rows on one TP rank: the vocabulary padded to a multiple of 128 x tp (Megatron-LM's
    padding, convert.py `padded_vocab_size`), split over tp."""
    m = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // m) * m // tp


def mcore_params(s: Shapes, tp: int = 1, pp: int = 1, ep: int = 1, stage: int = 0) -> dict:
    """Parameters per leaf group on one rank of pipeline stage `stage` under engine=megatron (convert.py's
    shards): the ViT and merger whole (replicated over TP; a copy on every stage); of the decoder layers / pp
    layers, their attention and MLP matrices and qkv biases / tp, the norms whole; the first stage the embedding,
    the last the final norm and head (`vocab_rows` each; tied: a head copy only on a last stage that is not the
    first); a MoE layer its router whole and E / ep experts."""
    t = s.text
    h, q, kv = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim
    matrices = (h + t.qkv_bias) * (q + 2 * kv) + q * h + 3 * h * t.intermediate  # qkv (+ bias), o_proj, the MLP
    layer = matrices // tp + 2 * t.head_dim * t.qk_norm + 2 * h
    n, first, last = t.layers // pp, stage == 0, stage == pp - 1
    rows = vocab_rows(t.vocab, tp) * h
    llm = n * layer + rows * first + (rows * (not t.tied or not first) + h) * last
    out = {"vision": s.vision.vision_params(), "merger": s.vision.merger_params()}
    if not t.experts:
        return {**out, "llm": llm}
    m = t.sparse_layers * n // t.layers  # this stage's sparse layers (MoE runs at pp 1)
    return {**out, "dense": llm - m * 3 * h * t.intermediate // tp, "router": m * t.router_params(),
            "experts": m * t.expert_params() // ep}


def mcore_layer_bytes(t: TextShape, b: int, tp: int = 1, sequence_parallel: bool = False, span: int = 0,
                      sparse: bool = False) -> tuple[float, float]:
    """(bytes saved per token by one layer of engine=megatron's decoder on one TP rank, its backward gradients per
    token), as megatron-core's local spec with training/mcore/model.py's SegmentAttention keeps them
    (tests/test_memory_estimate.py measures it), with CUDA's fused RMSNorm: each of the input and pre-MLP norms its
    input and fp32 1/rms, and its output (the next linear's input), / tp under sequence parallelism; Qwen3's q/k
    norms their inputs (q's copy, k's view of the whole qkv output) and 1/rms; RoPE's cos and sin, made per call for
    q and k; the attention: `span` 0 (packed rows, SDPA per segment, a fused kernel) q, k and v (the rank's groups,
    not repeated: enable_gqa), the kernel's output and fp32 log-sum-exp per head, and o_proj's input (the segments'
    outputs in sequence order, a copy); `span` > 0 (padded rows of span keys with their mask: SDPA's math kernel,
    bf16 upcast to fp32) fp32 scaled q and k and v repeated to the rank's heads, the fp32 softmax of span keys per
    head and o_proj's input; the MLP's fc1 output (2I / tp), silu(gate), up + 0 (glu_linear_offset) and their
    product (I / tp each), or megatron's MoE layer (`mcore_moe_bytes`). Gradients: `layer_bytes`'s with the TP
    widths, and with `span` the softmax's and the scores' (fp32)."""
    h, hd = t.hidden, t.head_dim
    heads, groups = t.heads // tp, max(1, t.kv_heads // tp)  # tp a multiple of the groups: one group a rank
    q, kv = heads * hd, groups * hd
    norms = 2 * (2 * b * h + 4) / (tp if sequence_parallel else 1)
    qk_norm = b * 2 * (q + kv) + 4 * (heads + groups) if t.qk_norm else 0
    if span:  # the math kernel: 3 fp32 copies of the heads' width, the fp32 softmax
        attn, attn_grads = 3 * 4 * q + 4 * heads * span + b * q, 8 * heads * span
    else:  # a fused kernel's q, k, v, output and log-sum-exp; o_proj's input
        attn, attn_grads = b * (3 * q + 2 * kv) + 4 * heads, 0
    if sparse:
        mlp, mlp_grads = mcore_moe_bytes(t, b)
    else:
        mlp, mlp_grads = 5 * b * t.intermediate / tp, 2 * b * t.intermediate / tp
    saved = norms + qk_norm + 4 * hd * b + attn + mlp
    return saved, mlp_grads + b * (2 * h + q + 2 * kv) + attn_grads


def mcore_moe_bytes(t: TextShape, b: int) -> tuple[float, float]:
    """(bytes saved per token by one megatron MoE layer, its MLP gradients per token; training/mcore/moe.py:
    SequentialMLP experts, the alltoall dispatcher, tokens balanced over the EP ranks): the router's top-k indices
    (int64, megatron's and the tap's), fp32 top-k softmax, routing map (bool) and fp32 probabilities over E, the
    permutation (int64) and fp32 weight of each routed copy; per copy (k per token) the permuted input row (H), the
    expert's fc1 output (2I), silu(gate), up + 0, their product and its routing-weighted copy (I each)."""
    E, k, h, i = t.experts, t.top_k, t.hidden, t.moe_intermediate
    return 16 * k + 4 * k + 5 * E + 12 * k + k * b * (h + 6 * i), 4 * E + k * b * (2 * i + 2 * h)


def in_flight(pp: int, vpp: int, micro_batches: int, stage: int = 0) -> int:
    """Forward passes (of one chunk: layers / (pp x vpp) layers) whose activations pipeline stage `stage` holds at
    once: megatron's warm-up + 1 (schedules.py `get_pp_rank_microbatches`), at most all of them: 1F1B
    min(pp - stage, m); interleaved min(2 (pp - stage - 1) + (vpp - 1) pp + 1, m x vpp). pp 1: one."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - stage, micro_batches)
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)


def _mcore_state(plan: Plan, add, b: int, leaves: tuple, stage: int) -> None:
    """engine=megatron's parameters, gradient buffers, optimizer states and frozen models on one rank."""
    s, tp, pp, dp = plan.shapes, plan.tp, plan.pp, plan.dp
    counts = mcore_params(s, tp, pp, plan.ep, stage)
    total, trained = sum(counts.values()), sum(counts[g] for g in leaves)
    where = f"stage {stage} of {pp}: {s.text.layers // pp} layers, " if pp > 1 else ""
    add("parameters", total * b, f"{_b(total)} on this rank ({where}decoder matrices and vocabulary / tp {tp}, "
        f"ViT whole) x {b} B")
    unused = " (the ViT's unused copy's included)" if stage > 0 and {"vision", "merger"} & set(leaves) else ""
    add("gradients", trained * 4, f"{_b(trained)} trained x 4 B (megatron DDP's fp32 buffers){unused}")
    per = 12 if b == 2 else 8
    experts = counts.get("experts", 0) * ("experts" in leaves)
    shard = (trained - experts) / dp + experts * plan.ep / dp if plan.distributed_optimizer else trained
    add("optimizer states", shard * per, f"{_b(trained)} trained x {per} B (Adam m, v" + (", fp32 master" if b == 2
        else "") + ")" + (f" / {dp} data-parallel ranks (distributed optimizer"
                          + (f"; experts / {dp // plan.ep}" if experts and plan.ep > 1 else "") + ")"
                          if plan.distributed_optimizer else " (not sharded)"))
    if plan.reference:
        add("reference model", total * b, f"frozen starting weights {_b(total)} x {b} B (split like the policy)")
    if plan.teacher is not None:
        tt = sum(mcore_params(plan.teacher, tp, pp, plan.ep, stage).values())
        add("teacher model", tt * b, f"frozen teacher {_b(tt)} on this rank x {b} B (split like the policy)")


def _mcore_decoder(plan: Plan, add, b: int, stage: int) -> None:
    """engine=megatron's decoder activations on one rank (module docstring)."""
    T, tp, tokens = plan.shapes.text, plan.tp, plan.tokens
    span = plan.prompt_len + plan.max_new_tokens if plan.rollouts else 0  # RL: padded rollout rows
    sp = plan.sequence_parallel
    k = in_flight(plan.pp, plan.vpp, plan.grad_accum, stage)
    per_pass = T.layers // (plan.pp * plan.vpp)
    kinds = [(kind, n * per_pass // T.layers, *mcore_layer_bytes(T, b, tp, sp, span, kind == "MoE "))
             for kind, n in (("", T.layers - T.sparse_layers), ("MoE ", T.sparse_layers)) if n]
    host = plan.offload_activations and stage == plan.pp - 1
    flight = f"{k} forward passes in flight x " if plan.pp > 1 else ""
    where = " (offload_activations: host)" if host else ""
    scores = f"; rollout rows: {T.heads // tp} heads x {span} fp32 scores" if span else ""
    if plan.checkpointing:  # Decoder.recompute: the layer inputs (the rank's slice under sequence parallelism)
        add("decoder activations", k * per_pass * tokens / (tp if sp else 1) * T.hidden * b,
            f"{flight}{per_pass} layers x {tokens} tokens" + (f" / {tp}" if sp else "")
            + f" x {T.hidden} x {b} B (checkpointed layer inputs){where}", host=host, phase="decoder")
        _, _, saved, grads = max(kinds, key=lambda x: x[2] + x[3])
        add("decoder layer in backward", tokens * (saved + grads),
            f"{tokens} tokens x ({saved / 1024:.1f} KiB saved + {grads / 1024:.1f} KiB gradients) per token "
            f"(recomputed{scores})", phase="decoder")
    else:
        layers = " + ".join(f"{n} {kind}layers x {tokens} tokens x {saved / 1024:.1f} KiB per token"
                            for kind, n, saved, _ in kinds)
        add("decoder activations", k * tokens * sum(n * saved for _, n, saved, _ in kinds),
            f"{flight}{layers} (no recompute{scores}){where}", host=host, phase="decoder")
        grads = max(g for *_, g in kinds)
        add("decoder layer in backward", tokens * grads,
            f"{tokens} tokens x {grads / 1024:.1f} KiB gradients per token", phase="decoder")
    if span:  # padded rows: Decoder.forward's [B, 1, L, L] mask, kept by each pass (recompute reads it again)
        add("attention masks", k * tokens * span, f"{k} x {tokens} x {span} bools (one mask a forward pass)",
            phase="decoder")
    if plan.pp > 1:  # the in-flight passes' outputs, on the hidden states the DeepStack features carried on
        carried = max(0, plan.shapes.vision.deepstack - per_pass)
        add("pipeline buffers", k * (1 + carried) * tokens / (tp if sp else 1) * T.hidden * b,
            f"{k} outputs of {(1 + carried)} x {tokens} tokens" + (f" / {tp}" if sp else "") + f" x {T.hidden} x {b} B",
            phase="decoder")


def _zero_state(plan: Plan, add, b: int, leaves: tuple) -> None:
    """The DeepSpeed engine's parameters, gradients, optimizer states, ZeRO-3 working set and frozen models."""
    s, T = plan.shapes, plan.shapes.text
    W, z = plan.world, plan.zero_stage
    counts = s.params()
    total, trained = sum(counts.values()), sum(counts[g] for g in leaves)
    parted = W if z == 3 else 1
    add("parameters", total * b / parted, f"{_b(total)} x {b} B" + (f" / {W} ranks (ZeRO-3)" if z == 3 else "")
        + (" (offload_params: host)" if plan.offload_params else ""), host=plan.offload_params)
    if z >= 2:
        largest = max(T.vocab * T.hidden * (s.head_group in leaves),  # lm_head; a MoE layer's gate_up_proj
                      T.experts * 2 * T.moe_intermediate * T.hidden * ("experts" in leaves))
        bucket = max(REDUCE_BUCKET, largest) if trained else 0
        bucket = min(bucket, trained)
        if plan.offload_optimizer:
            add("gradients", bucket * b, f"reduce bucket {_b(bucket)} x {b} B (partition on host)")
            add("gradients (host)", trained * 4 / W, f"{_b(trained)} trained x 4 B / {W} ranks", host=True)
        else:
            add("gradients", trained * b / W + bucket * b,
                f"{_b(trained)} trained x {b} B / {W} ranks (ZeRO-{z}) + reduce bucket {_b(bucket)}")
    else:
        add("gradients", trained * b, f"{_b(trained)} trained x {b} B (ZeRO-{z}: not partitioned)")
    per = 8 if (b == 4 and z == 0) else 12
    add("optimizer states", trained * per / (W if z >= 1 else 1),
        f"{_b(trained)} trained x {per} B (fp32 master, Adam m, v)" + (f" / {W} ranks" if z >= 1 else "")
        + (" (offload_optimizer: host)" if plan.offload_optimizer else ""), host=plan.offload_optimizer)
    if z == 3 and W > 1:  # the student's or the teacher's (their forwards never overlap)
        biggest, what = max(_largest_module(m.text) for m in (s, plan.teacher) if m is not None)
        add("ZeRO-3 working set", (biggest + PREFETCH_BUCKET) * b,
            f"largest module gathered ({_b(biggest)}: {what}) + prefetch bucket {_b(PREFETCH_BUCKET)}, x {b} B")
    if plan.reference:
        add("reference model", total * b / parted, f"frozen starting weights {_b(total)} x {b} B"
            + (f" / {W} ranks" if z == 3 else ""))
    if plan.teacher is not None:
        tt = sum(plan.teacher.params().values())
        add("teacher model", tt * b / parted, f"frozen teacher {_b(tt)} x {b} B" + (f" / {W} ranks" if z == 3 else ""))


def estimate(plan: Plan) -> Estimate:
    """Per-rank memory of `plan`, component by component (the module docstring has every formula)."""
    mc = plan.megatron
    if mc and plan.pp > 1 and plan.stage is None:  # the first stage (ViT, embedding, most in flight) or the last
        worst = max((estimate(replace(plan, stage=st)) for st in (0, plan.pp - 1)), key=lambda e: e.device_gib)
        return replace(worst, plan=plan)
    s, T = plan.shapes, plan.shapes.text
    b = 2 if plan.dtype == "bf16" else 4
    sp = 1 if mc else plan.sp_size  # the megatron engine refuses parallel.sp_size > 1
    stage = plan.stage or 0
    first, last = stage == 0, stage == plan.pp - 1
    leaves = s.leaves(plan.trainable)
    out = Estimate(plan, stage=stage)

    def add(name, nbytes, note, host=False, phase="step"):
        out.parts.append(Part(name, 0.0 if host else nbytes, nbytes if host else 0.0, note, phase))

    # -- model state
    if mc:
        _mcore_state(plan, add, b, leaves, stage)
    else:
        _zero_state(plan, add, b, leaves)

    # -- decoder (its phase: from the end of the ViT's forward to the start of the ViT's backward)
    tokens = plan.tokens
    t = math.ceil(tokens / sp)
    if plan.rollouts:  # generation: the KV cache of every rollout at once, and the prefill of one layer
        prompt_tokens = plan.mini_batches * plan.grad_accum * plan.micro_batch_size * plan.seq_len
        rollout_tokens = plan.rollouts * prompt_tokens * (1 + plan.max_new_tokens / plan.prompt_len)
        kv = 2 * T.layers * T.kv_heads * T.head_dim * b
        add("rollout KV cache", rollout_tokens * kv,
            f"{plan.rollouts} x {prompt_tokens} prompt tokens ({plan.mini_batches} steps' rows) x (1 + "
            f"{plan.max_new_tokens}/{plan.prompt_len} new per prompt token) x {kv / 1024:.0f} KiB", phase="rollout")
        prefill = max(k[2] for k in decoder_layers(T, b, 1, plan.tiled_mlp))
        add("rollout prefill layer", plan.rollouts * prompt_tokens * prefill,
            f"{plan.rollouts} x {prompt_tokens} prompt tokens through one layer (no gradients)", phase="rollout")
        if mc:  # Engine.generation: the HF decoder gets the gathered weights (and stays on the device)
            lm = sum(n for g, n in s.params().items() if g not in ("vision", "merger"))
            add("HF decoder for generation", lm * b, f"the whole HF decoder {_b(lm)} x {b} B (gathered weights)")
            add("gathered weights", lm * b, f"{_b(lm)} x {b} B, held while generating", phase="rollout")
    where = " (offload_activations: host)" if plan.offload_activations else ""
    if mc:
        _mcore_decoder(plan, add, b, stage)
    elif plan.checkpointing:
        add("decoder activations", T.layers * t * T.hidden * b,
            f"{T.layers} layers x {t} tokens x {T.hidden} x {b} B (checkpointed layer inputs){where}",
            host=plan.offload_activations, phase="decoder")
    else:
        kinds = decoder_layers(T, b, sp, plan.tiled_mlp)
        add("decoder activations", t * sum(n * saved for _, n, saved, _ in kinds),
            " + ".join(f"{n} {kind}layers x {t} tokens x {saved / 1024:.1f} KiB per token" for kind, n, saved, _ in kinds)
            + where, host=plan.offload_activations, phase="decoder")
    if not mc:
        # the layer recomputed in backward: the largest
        _, _, per_layer, grads = max(decoder_layers(T, b, sp, plan.tiled_mlp), key=lambda k: k[2] + k[3])
        tiled = f", MLP in {plan.tiled_mlp} tiles" if plan.tiled_mlp > 1 else ""
        add("decoder layer in backward", t * (per_layer + grads),
            f"{t} tokens x ({per_layer / 1024:.1f} KiB saved + {grads / 1024:.1f} KiB gradients) per token{tiled}",
            phase="decoder")
    if sp > 1:
        kv = max(T.kv_heads, sp)
        add("Ulysses buffers", 2 * t * (2 * T.heads * T.head_dim + 2 * kv * T.head_dim) * b,
            f"2 x {t * sp} tokens x (q, out: {T.heads}/{sp} heads; k, v: {kv}/{sp}) x {T.head_dim} x {b} B",
            phase="decoder")

    # -- vision (the first pipeline stage): what the ViT stores lives all step (forward to its backward, after the
    # decoder's); under a pipeline once per micro-batch in flight
    if first:
        _vision(plan, add, b, where)

    # -- loss (the last stage; at the end of the decoder's forward, its gradients into the decoder's backward)
    if last:
        _loss(plan, add, b, leaves, t)
    peak = out.device_gib * GiB
    add("allowance", ALLOWANCE_GIB * GiB + ALLOWANCE_FRACTION * peak,
        f"{ALLOWANCE_GIB:g} GiB (CUDA context, NCCL) + {ALLOWANCE_FRACTION:.0%} of the peak (fragmentation)")
    return out


def _vision(plan: Plan, add, b: int, where: str) -> None:
    """The ViT's and merger's activations, the pixel values and the visual features."""
    V, sp = plan.shapes.vision, 1 if plan.megatron else plan.sp_size
    visual = plan.visual_fraction * plan.micro_batch_size * plan.seq_len  # merged visual tokens (RL: of the prompts)
    patches_row = visual * V.merge ** 2
    share = sp if plan.sp_vision == "split" else 1
    patches = patches_row / share
    blk, blk_grads = block_bytes(V, b)
    vision_trained = "vision" in plan.trainable
    k = min(plan.grad_accum, -(-in_flight(plan.pp, plan.vpp, plan.grad_accum) // plan.vpp)) if plan.megatron else 1
    times = f"{k} micro-batches in flight x " if k > 1 else ""
    if vision_trained:
        stored = V.depth * patches * (V.hidden * b if plan.checkpointing else blk)
        add("ViT activations", k * stored, f"{times}{V.depth} blocks x {patches:.0f} patches x "
            + (f"{V.hidden} x {b} B (checkpointed)" if plan.checkpointing else f"{blk / 1024:.1f} KiB")
            + f" ({plan.visual_fraction:g} of the tokens visual, {V.merge ** 2} patches each"
            + (f", 1/{sp} of the row's" if share > 1 else "") + f"){where}", host=plan.offload_activations)
    if vision_trained or "merger" in plan.trainable:
        mergers = 1 + V.deepstack
        add("merger activations",
            k * mergers * patches / V.merge ** 2 * (4 * V.merge ** 2 * V.hidden + V.out_hidden) * b,
            f"{times}{mergers} merger(s) x {patches / V.merge ** 2:.0f} tokens x (4 x {V.merge ** 2} x {V.hidden} + "
            f"{V.out_hidden}) x {b} B{where}", host=plan.offload_activations)
    add("pixel values", k * (patches_row * V.pixels_per_patch * 4 + patches * V.pixels_per_patch * b),
        f"{times}{patches_row:.0f} patches x {V.pixels_per_patch} x 4 B (the whole micro-batch, fp32) + this rank's "
        f"{patches:.0f} x {b} B")
    add("ViT block in " + ("backward" if vision_trained else "forward (frozen)"),
        patches * (blk + (blk_grads if vision_trained else 0)),
        f"{patches:.0f} patches x {(blk + blk_grads * vision_trained) / 1024:.1f} KiB", phase="vit")
    copies = 2 if sp > 1 else 1
    add("visual features", visual * V.out_hidden * (1 + V.deepstack) * b * copies,
        f"{visual:.0f} tokens x {V.out_hidden} x {1 + V.deepstack} x {b} B"
        + (" x 2 (the SP group's gather and its reordering)" if sp > 1 else ""), phase="vit")


def _loss(plan: Plan, add, b: int, leaves: tuple, t: int) -> None:
    """The loss chunk, the supervised hidden states (and grad_h, the head's fp32 gradient where fused), a
    teacher's outputs."""
    s, T = plan.shapes, plan.shapes.text
    chunk = min(plan.loss_chunk or max(1, CHUNK_BYTES // (4 * T.vocab)), t)
    if plan.teacher is not None:  # its hidden states of the step's micro-batches (stages/distill.py frozen_pass:
        Tt = plan.teacher.text  # computed before the student's calls), and its logits of the chunk
        m = max(1, plan.grad_accum)
        add("teacher outputs", m * t * Tt.hidden * b + chunk * Tt.vocab * 4,
            f"teacher hidden of {m} micro-batch(es) x {t} tokens x {Tt.hidden} x {b} B (kept from the teacher's "
            f"pass until each loss) + one chunk of its fp32 logits", phase="decoder")
    if plan.megatron and plan.objective == "lm":  # megatron's vocabulary-parallel cross-entropy (mcore/loss.py)
        rows = vocab_rows(T.vocab, plan.tp)
        head = rows * T.hidden * 4 if s.head_group in leaves else 0
        add("loss", 3 * chunk * rows * 4 + 2 * t * T.hidden * b + head,
            f"3 x {chunk} x {rows} x 4 B (one chunk of this rank's vocabulary shard) + hidden and grad_h of {t} "
            f"tokens" + (f" + lm_head shard fp32 grad {_b(rows * T.hidden)} x 4 B" if head else ""), phase="decoder")
        return
    if plan.megatron:  # the head's logits gathered over TP, each chunk recomputed in backward
        gathered = chunk * vocab_rows(T.vocab, plan.tp) * plan.tp * b
        add("loss", 3 * chunk * T.vocab * 4 + gathered + t * T.hidden * b,
            f"3 x {chunk} x {T.vocab} x 4 B (one chunk) + its logits gathered over TP ({chunk} x "
            f"{vocab_rows(T.vocab, plan.tp) * plan.tp} x {b} B) + hidden of {t} tokens (recomputed in backward)",
            phase="decoder")
        return
    fused = plan.objective in ("lm", "distill") and not (plan.zero_stage == 3 and plan.world > 1)
    head = T.vocab * T.hidden * 4 if fused and s.head_group in leaves else 0
    add("loss", 3 * chunk * T.vocab * 4 + t * T.hidden * b * (2 if fused else 1) + head,
        f"3 x {chunk} x {T.vocab} x 4 B (one chunk) + hidden of {t} tokens"
        + (" and grad_h" if fused else "") + (f" + lm_head fp32 grad {_b(T.vocab * T.hidden)} x 4 B" if head else "")
        + ("" if fused else " (recomputed in backward)"), phase="decoder")


def fits(plan: Plan, device_gib: float, host_gib: float = HOST_GIB) -> tuple[bool, Estimate]:
    """(the estimate fits `device_gib` of accelerator memory and `host_gib` of host memory per rank, the estimate)."""
    est = estimate(plan)
    return est.device_gib <= device_gib and est.host_gib <= host_gib, est


# ---------------------------------------------------------------- levers


# (Plan field, config override key, cost rank: cheaper levers are named first)
LEVERS = (("checkpointing", "model.gradient_checkpointing", 1), ("tiled_mlp", "model.tiled_mlp", 2),
          ("distributed_optimizer", "engine.distributed_optimizer", 2),
          ("sequence_parallel", "engine.sequence_parallel", 2), ("sp_size", "parallel.sp_size", 3),
          ("tp", "engine.tp", 3), ("ep", "engine.ep", 3), ("zero_stage", "engine.zero_stage", 4),
          ("pp", "engine.pp", 4), ("micro_batch_size", "trainer.micro_batch_size", 5),
          ("offload_activations", "model.offload_activations", 6), ("offload_optimizer", "engine.offload_optimizer", 7))
KEYS = {f: k for f, k, _ in LEVERS}
COST = {f: c for f, _, c in LEVERS}


def tp_sizes(t: TextShape, world: int, pp: int = 1) -> list[int]:
    """Tensor-parallel sizes within a node (<= 8) that the decoder splits into (training/mcore/model.py check_tp:
    the query heads, the MLP width and the qkv rows divide; the key/value heads divide or are divided) and that
    divide world / pp; MoE: 1 (megatron's MoE layer trains at tp 1 here)."""
    return [n for n in ((1,) if t.experts else (1, 2, 4, 8))
            if t.heads % n == 0 and (t.kv_heads % n == 0 or n % t.kv_heads == 0) and t.intermediate % n == 0
            and (t.heads + 2 * t.kv_heads) * t.head_dim % n == 0 and world % (n * pp) == 0]


def _options(plan: Plan) -> dict:
    """Each lever's values, mildest first, that differ from the plan (engine=megatron: its own layout levers; it
    runs none of DeepSpeed's SP, TiledMLP, ZeRO or optimizer offload)."""
    from training.parallel import valid_sp_sizes

    T = plan.shapes.text
    mc = plan.megatron
    opts = {"checkpointing": [] if plan.checkpointing else [True],
            "micro_batch_size": [n for n in (plan.micro_batch_size // 2 ** k for k in range(1, 8))
                                 if 1 <= n < plan.micro_batch_size][:3],
            "offload_activations": [] if plan.offload_activations else [True]}
    if opts["micro_batch_size"] and opts["micro_batch_size"][-1] != 1:
        opts["micro_batch_size"].append(1)
    if mc:
        opts.update({"distributed_optimizer": [] if plan.distributed_optimizer else [True],
                     "sequence_parallel": [] if plan.sequence_parallel or T.experts else [True],
                     "tp": [n for n in tp_sizes(T, plan.world, plan.pp) if n > plan.tp],
                     "ep": [n for n in (2, 4, 8, 16, 32, 64) if n > plan.ep and T.experts % n == 0]
                     if T.experts else [],
                     "pp": [n for n in (2, 4, 8, 16) if n > plan.pp and T.layers % (n * plan.vpp) == 0]
                     if plan.pp_allowed and not T.experts else []})
    else:
        opts.update({"tiled_mlp": [n for n in (2, 4, 8, 16) if n > max(1, plan.tiled_mlp)] if not T.experts else [],
                     "sp_size": [n for n in valid_sp_sizes(T.heads, T.kv_heads) if n > plan.sp_size
                                 and plan.world % n == 0] if plan.sp_allowed else [],
                     "zero_stage": [3] if plan.zero_stage < 3 else [],
                     "offload_optimizer": [] if plan.offload_optimizer else [True]})
    return {k: v for k, v in sorted(opts.items(), key=lambda kv: COST[kv[0]]) if v}


def _valid(plan: Plan) -> bool:
    """A layout the engine runs: optimizer offload needs ZeRO; megatron's sequence parallelism tp > 1, tp x pp
    dividing the world and ep the data-parallel ranks."""
    if plan.megatron:
        return (plan.tp > 1 or not plan.sequence_parallel) and plan.world % (plan.tp * plan.pp) == 0 \
            and plan.dp % plan.ep == 0
    return not (plan.offload_optimizer and plan.zero_stage == 0)


def levers(plan: Plan, device_gib: float, limit: int = 3, host_gib: float = HOST_GIB) -> list[dict]:
    """For a plan that does not fit: the smallest sets of lever changes that make it fit, cheapest first (at most
    `limit`; [] when it fits already or nothing does). Each set is {Plan field: value}; `overrides` spells it."""
    if fits(plan, device_gib, host_gib)[0]:
        return []
    opts = _options(plan)
    for k in range(1, len(opts) + 1):
        found = []
        for names in itertools.combinations(opts, k):
            for values in itertools.product(*(opts[n] for n in names)):  # mildest values first
                change = dict(zip(names, values))
                candidate = replace(plan, **change)
                if not _valid(candidate):
                    continue
                ok, est = fits(candidate, device_gib, host_gib)
                if ok:
                    found.append((sum(COST[n] for n in names), est.device_gib, change))
                    break
        if found:
            return [c for _, _, c in sorted(found, key=lambda f: (f[0], f[1]))[:limit]]
    return []


def overrides(change: dict) -> list[str]:
    """A lever set as training.train overrides."""
    return [f"{KEYS[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()]


def describe_levers(plan: Plan, device_gib: float, host_gib: float = HOST_GIB) -> str:
    if fits(plan, device_gib, host_gib)[0]:
        return "none needed: it fits"
    found = levers(plan, device_gib, host_gib=host_gib)
    if not found and plan.megatron:
        return ("no combination of the levers (checkpointing, the distributed optimizer, TP sequence "
                "parallelism, engine.tp, engine.pp, engine.ep, fewer rows per micro-batch, activation offload) fits: "
                "use more ranks, a shorter seq_len or a DeepSpeed engine")
    if not found:
        return ("no combination of the levers (checkpointing, tiled MLP, sequence parallelism, ZeRO-3, fewer rows "
                "per micro-batch, activation and optimizer offload) fits: use more ranks or a shorter seq_len")
    return "; or ".join(f"{' '.join(overrides(c))} ({estimate(replace(plan, **c)).device_gib:.1f} GiB)" for c in found)


# ---------------------------------------------------------------- from the project's config


def from_job(job, world: int, fallback: Optional[Shapes] = None) -> Plan:
    """The estimate's inputs for a training.train JobConfig on `world` processes. Shapes: model.path's
    config.json when it exists, the tiny preset when model.path is unset, else `fallback` (a recipe step whose
    model.path is an earlier step's export that does not exist yet); ValueError when none is known."""
    from stages import build_objective

    m = job.model
    if m.path is None:
        shapes = tiny(m.family, m.tiny)
    elif (Path(m.path) / "config.json").is_file():
        shapes = from_config_json(Path(m.path) / "config.json")
    elif fallback is not None:
        shapes = fallback
    else:
        raise ValueError(f"model.path={m.path} has no config.json (yet): the model's shapes are unknown; name a "
                         f"preset ({sorted(PRESETS)}) or an HF config")
    objective = dict(job.stage.objective)
    name = objective.get("name", "lm")
    teacher = None
    if name == "distill" and objective.get("teacher") != "precomputed":  # precomputed: no teacher model runs
        # its config.json, else the shapes standing in for not-yet-written exports
        conf = Path(str(objective.get("teacher"))) / "config.json"
        teacher = from_config_json(conf) if conf.is_file() else (fallback or shapes)
    e, built = job.engine, build_objective(job.stage.objective)
    layout = dict(engine="megatron", tp=e.tp, pp=e.pp, vpp=e.vpp, ep=e.ep, sequence_parallel=e.sequence_parallel,
                  distributed_optimizer=e.distributed_optimizer, pp_allowed=built.no_pipeline is None) \
        if e.kind == "megatron" else {}
    return Plan(teacher=teacher, shapes=shapes, seq_len=job.stage.seq_len, world=world, micro_batch_size=job.trainer.micro_batch_size,
                sp_size=job.parallel.sp_size, sp_vision=job.parallel.sp_vision,
                zero_stage=0 if layout else e.zero_stage,  # megatron: not read
                dtype=e.dtype, offload_optimizer=e.offload_optimizer,
                offload_params=e.offload_params, checkpointing=m.gradient_checkpointing,
                offload_activations=m.offload_activations, tiled_mlp=m.tiled_mlp, trainable=tuple(job.stage.trainable),
                objective=name, reference=name == "dpo" or (name == "sapo" and objective.get("kl_beta", 0) > 0),
                sp_allowed=not built.no_sequence_parallel, loss_chunk=m.loss_chunk,
                grad_accum=job.trainer.grad_accum, **_rl(name, objective), **layout)


def _rl(name: str, objective: dict) -> dict:
    """The RL rollout's numbers from stage.objective (the objective's own defaults where it leaves them out);
    on-policy distillation's rollouts count like RL's (one mini-batch per rollout)."""
    if name == "distill" and objective.get("lmbda", 0) > 0:
        from stages.distill import Config as D

        return dict(rollouts=objective.get("num_generations", D.num_generations),
                    max_new_tokens=objective.get("max_new_tokens", D.max_new_tokens), mini_batches=1)
    if name != "sapo":
        return {}
    from stages.sapo import Config

    d = Config()
    return dict(rollouts=objective.get("num_generations", d.num_generations),
                max_new_tokens=objective.get("max_new_tokens", d.max_new_tokens),
                mini_batches=objective.get("mini_batches", d.mini_batches))


# ---------------------------------------------------------------- CLI


def _layout(est: Estimate) -> str:
    p = est.plan
    return (f"megatron tp {p.tp} x pp {p.pp}" + (f" (vpp {p.vpp})" if p.vpp > 1 else "") + f" x dp {p.dp}"
            + (f", experts over ep {p.ep}" if p.ep > 1 else "") + (", sequence parallel" if p.sequence_parallel else "")
            + (", distributed optimizer" if p.distributed_optimizer else "")
            + (f"; pipeline stage {est.stage} of {p.pp} (the larger of the first and the last)" if p.pp > 1 else ""))


def render(est: Estimate, device_gib: float, name: str = "", host_gib: float = HOST_GIB) -> str:
    p, s = est.plan, est.plan.shapes
    counts = s.params()
    levers_on = [w for w, on in (("checkpointing", p.checkpointing), ("offload_activations", p.offload_activations),
                                 (f"tiled_mlp={p.tiled_mlp}", p.tiled_mlp > 1), ("offload_optimizer",
                                 p.offload_optimizer), ("offload_params", p.offload_params)) if on]
    lines = [f"per-rank memory estimate: {name or s.family} ({_b(sum(counts.values()))} parameters: "
             + ", ".join(f"{g} {_b(n)}" for g, n in counts.items()) + ")",
             f"{p.micro_batch_size} x {p.seq_len} tokens per micro-batch"
             + (f" of prompts ({p.tokens} rollout tokens to train on)" if p.rollouts else "")
             + f", {p.world} ranks, " + (_layout(est) if p.megatron else f"sp_size {p.sp_size}"
                                            + (f" (ViT {p.sp_vision})" if p.sp_size > 1 else "")
                                            + f", ZeRO-{p.zero_stage}")
             + f", {p.dtype}, trains "
             + "+".join(p.trainable) + f", objective {p.objective}; levers: " + (", ".join(levers_on) or "none"),
             f"{'component':<27} {'when':<7} {'device GiB':>10} {'host GiB':>8}  formula"]
    for part in est.parts:
        host = f"{part.host / GiB:8.2f}" if part.host else f"{'-':>8}"
        lines.append(f"{part.name:<27} {part.phase:<7} {part.device / GiB:10.2f} {host}  {part.note}")
    phases = [f"{ph} {est.phase_gib(ph):.2f}" for ph in PHASES[1:] if any(x.phase == ph for x in est.parts)]
    lines.append(f"{'total (peak)':<27} {'':<7} {est.device_gib:10.2f} {est.host_gib:8.2f}  step "
                 f"{est.phase_gib('step'):.2f} + max({', '.join(phases)}): those phases never coexist")
    ok = est.device_gib <= device_gib and est.host_gib <= host_gib
    host = f" (host memory {est.host_gib:.1f} of {host_gib:g} GiB per rank)" if est.host_gib else ""
    lines.append(f"fits in {device_gib:g} GiB: {'yes' if ok else 'no'}{host}")
    if not ok:
        lines.append(f"levers that make it fit: {describe_levers(p, device_gib, host_gib)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.memory estimate",
                                 description="Analytic per-rank memory of one training step (training/estimate.py).")
    ap.add_argument("--model", default="qwen3_vl_8b",
                    help=f"a preset ({', '.join(PRESETS)}), tiny_<family>, or an HF config.json / its directory")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1, help="packed rows per micro-batch")
    ap.add_argument("--world", type=int, default=8, help="training processes (GPUs)")
    ap.add_argument("--sp", type=int, default=1, help="parallel.sp_size")
    ap.add_argument("--sp-vision", choices=("split", "replicate"), default="split")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=3)
    ap.add_argument("--engine", choices=("deepspeed", "megatron"), default="deepspeed",
                    help="megatron: --tp/--pp/--vpp/--ep layout (--sp, --zero, --tiled-mlp and the offloads of "
                         "optimizer and parameters do not apply)")
    ap.add_argument("--tp", type=int, default=1, help="megatron: engine.tp")
    ap.add_argument("--pp", type=int, default=1, help="megatron: engine.pp")
    ap.add_argument("--vpp", type=int, default=1, help="megatron: engine.vpp")
    ap.add_argument("--ep", type=int, default=1, help="megatron: engine.ep (MoE)")
    ap.add_argument("--sequence-parallel", action="store_true", help="megatron: engine.sequence_parallel")
    ap.add_argument("--no-distributed-optimizer", action="store_true",
                    help="megatron: engine.distributed_optimizer=false")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing")
    ap.add_argument("--offload-activations", action="store_true")
    ap.add_argument("--tiled-mlp", type=int, default=0)
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--trainable", default="vision,merger,llm",
                    help="trained groups, comma-separated (a MoE model's llm leaves too: dense, router, experts)")
    ap.add_argument("--objective", choices=("lm", "dpo", "sapo", "distill"), default="lm")
    ap.add_argument("--teacher", help="distill: the teacher (a preset or an HF config.json / its directory); "
                                      "default: the model's own shapes")
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--visual-fraction", type=float, default=VISUAL_FRACTION,
                    help="share of the row's tokens that are visual (merged image/video tokens)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--rollouts", type=int, default=16, help="sapo: completions per prompt (num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="sapo")
    ap.add_argument("--mini-batches", type=int, default=2, help="sapo: optimizer steps per rollout")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="sapo: assumed mean prompt tokens")
    ap.add_argument("--device-gib", type=float, default=80.0)
    ap.add_argument("--host-gib", type=float, default=HOST_GIB, help="host memory per rank for offloaded state")
    ap.add_argument("--json", help="also write the components here")
    a = ap.parse_args(argv)
    trainable = tuple(g for g in a.trainable.split(",") if g)
    shapes = shapes_of(a.model)
    try:
        shapes.leaves(trainable)
    except ValueError as e:
        ap.error(f"--trainable: {e}")
    plan = Plan(shapes=shapes, seq_len=a.seq_len, world=a.world, micro_batch_size=a.micro_batch,
                sp_size=a.sp, sp_vision=a.sp_vision, zero_stage=a.zero, dtype=a.dtype,
                offload_optimizer=a.offload_optimizer, offload_params=a.offload_params, checkpointing=a.checkpointing,
                offload_activations=a.offload_activations, tiled_mlp=a.tiled_mlp, trainable=trainable,
                objective=a.objective, reference=a.objective == "dpo", sp_allowed=a.objective not in ("sapo", "distill"),
                teacher=shapes_of(a.teacher or a.model) if a.objective == "distill" else None,
                loss_chunk=a.loss_chunk, visual_fraction=a.visual_fraction, grad_accum=a.grad_accum,
                engine=a.engine, tp=a.tp, pp=a.pp, vpp=a.vpp, ep=a.ep, sequence_parallel=a.sequence_parallel,
                distributed_optimizer=not a.no_distributed_optimizer, pp_allowed=True,
                **(dict(rollouts=a.rollouts, max_new_tokens=a.max_new_tokens, mini_batches=a.mini_batches,
                        prompt_len=a.prompt_len) if a.objective == "sapo" else {}))
    est = estimate(plan)
    print(render(est, a.device_gib, a.model, a.host_gib))
    if a.json:
        Path(a.json).write_text(json.dumps({"plan": {k: v for k, v in asdict(plan).items() if k not in ("shapes", "teacher")},
                                            "model": a.model, **est.to_dict()}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
