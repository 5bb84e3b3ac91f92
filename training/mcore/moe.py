"""The sparse layers of Qwen3-VL-MoE on megatron-core 0.16: megatron's MoELayer from the local spec (experts a
`SequentialMLP` of local MLPs), with HF's routing, dense layers where HF keeps a dense MLP, and expert parallelism.

Routing equals HF's `Qwen3VLMoeTextTopKRouter` (softmax over all E experts, top-k, divided by the top-k sum):
megatron's softmax score function *without* pre-softmax takes the top-k of the raw logits (the same experts: softmax
is monotone) and softmaxes those k logits, exp(l_i) / sum_topk exp(l_j) = p_i / sum_topk p_j: the renormalised
top-k weights, with the same gradient. (`moe_router_pre_softmax=True` would give the un-renormalised p_i.) The gate
runs in the activations' dtype as HF's does (`moe_router_dtype` None); no expert bias, capacity or token dropping.

Megatron's own load-balancing / z losses are off (`moe_aux_loss_coeff=0`, load balancing "none"): the project
computes its own from the router statistics (training/moe.py). Each MoE layer's `Router` calls its `tap`, an
identity module whose forward takes and returns HF's router outputs (logits [tokens, E], top-k weights [tokens, k],
top-k experts [tokens, k], tokens in HF's [B, L] order, the logits in the graph): a test's forward hook on the tap
sees what one on HF's router sees. The engine's decoder hands each router's last logits (`Router.take`) to the model
step as HF's `output_router_logits` does, so training/moe.py `RouterStats` (it finds the layers by the class-name
suffix "TopKRouter") works on the megatron decoder unchanged (given the `sp` attribute it reads, None; at pp=1 its layer
indices are global; each EP rank's routers see that rank's own tokens, the data-parallel ones RouterStats sums over
all ranks). `routers(module)` lists (layer, Router) pairs.

Expert parallelism (`expert_model_parallel_size` = ep): EP rank r holds experts [r*E/ep, (r+1)*E/ep), megatron's
`local_expert_indices`, as `mlp.experts.local_experts.0 .. E/ep-1` (training/mcore/convert.py renumbers them); the
alltoall dispatcher sends each token to the ranks of its top-k experts and back. The experts are whole on each EP
rank (expert tensor parallelism 1). Their parameters carry megatron's `allreduce=False` when ep > 1: their
gradients are reduced over the expert-data-parallel group, every other one over the data-parallel group
(`Decoder.expert_parallel`). On CPU/gloo the dispatcher needs training/mcore/shim.py (its CUDA stream calls).
"""
from __future__ import annotations

import dataclasses
import re

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.router import TopKRouter

from training.mcore.convert import sparse_layers


def config_fields(hf, ep: int = 1) -> dict:
    """The TransformerConfig fields of an HF Qwen3-VL-MoE text config's MoE layers at expert-parallel size `ep`."""
    E, k = hf.num_experts, hf.num_experts_per_tok
    if not 0 < k <= E:
        raise ValueError(f"num_experts_per_tok={k} must be in 1..num_experts={E}")
    if ep < 1 or E % ep:
        raise ValueError(f"expert-parallel size {ep} must divide num_experts={E}")
    return dict(num_moe_experts=E, moe_router_topk=k, moe_ffn_hidden_size=hf.moe_intermediate_size,
                moe_layer_freq=[int(s) for s in sparse_layers(hf)],  # 0: a dense MLP (HF's mlp_only_layers, ...)
                moe_router_score_function="softmax", moe_router_pre_softmax=False,  # HF's renormalised top-k
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_permute_fusion=False,
                moe_router_fusion=False, expert_model_parallel_size=ep, expert_tensor_parallel_size=1)


class RoutingTopKRouter(torch.nn.Module):
    """Identity: forward(logits, top-k weights, top-k experts) returns them, for forward hooks (module docstring).
    Named for training/moe.py, which finds routers by the class-name suffix "TopKRouter"."""

    def forward(self, logits: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        return logits, weights, experts


class Router(TopKRouter):
    """megatron's TopKRouter that shows HF's router outputs to its `tap` on every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tap = RoutingTopKRouter()
        self.logits = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """The router logits as HF's (F.linear in the activations' dtype unless `moe_router_dtype` says fp32/fp64).
        megatron's `router_gating_linear` tests `te_general_gemm`, a name megatron-core 0.16's moe_utils defines
        only when Transformer Engine imports: without TE it raises NameError (CPU or GPU alike)."""
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask)  # [L*B, E], tokens in megatron's [L, B] order
        L, B = logits.shape[:2] if logits.ndim == 3 else (logits.shape[0], 1)
        weights, experts = probs.topk(self.topk, dim=-1)  # the chosen experts have p > 0, the others 0

        def hf_order(t):  # [L*B, n] -> [B*L, n]
            return t.reshape(L, B, -1).transpose(0, 1).reshape(L * B, -1)

        self.logits = hf_order(logits)  # the last call's logits, for the model step's router statistics (`take`)
        self.tap(self.logits, hf_order(weights), hf_order(experts))
        return probs, routing_map

    def take(self) -> torch.Tensor:
        """The logits of this router's last call ([tokens, E], HF's order, in the graph), handed over once."""
        logits, self.logits = self.logits, None
        return logits

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        """Off (no expert bias here); megatron's version is torch.compile'd, which would compile on every call
        site for nothing."""
        if self.enable_expert_bias:
            super()._apply_expert_bias(routing_map, padding_mask)


def block_spec(config, vp_stage: int | None = None):
    """megatron's local-spec block of this (virtual) pipeline stage: MoE layers (SequentialMLP experts, `Router`)
    where `config.moe_layer_freq` says 1, dense MLP layers where it says 0, RMSNorm."""
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                      vp_stage=vp_stage)
    layers = []
    for layer in spec.layer_specs:
        mlp = layer.submodules.mlp
        if hasattr(mlp.submodules, "router"):  # MoESubmodules
            mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=Router))
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
        layers.append(layer)
    return dataclasses.replace(spec, layer_specs=layers)


def routers(module: torch.nn.Module) -> list[tuple[int, Router]]:
    """(decoder layer index in the module, Router) of each MoE layer, in layer order (global indices at pp=1)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, Router):
            out.append((int(re.search(r"layers\.(\d+)\.", name).group(1)), m))
    return out
