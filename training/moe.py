"""Router statistics of a MoE model's training step: the global-batch load-balancing loss, the optional router
z-loss, and the expert-load metrics.

Load balancing (Switch Transformer; Qwen's global-batch form, arXiv 2501.11873), per MoE layer l, over the counted
tokens t of the *whole global batch* (every rank, data- and sequence-parallel, every accumulation micro-batch),
with E experts and top-k routing:

    L_l = E · Σ_e (c_le / T) · (P_le / T),   c_le: tokens whose top-k holds e,   P_le = Σ_t softmax(logits_lt)_e

and the aux loss is the mean of L_l over the MoE layers, times `stage.moe.aux_loss_coef`. At perfect balance
L_l = k: the scale of HF's and Qwen's loss, so the checkpoint's `text_config.router_aux_loss_coef` (the default
coefficient) keeps its meaning (Megatron's switch loss is L_l / k). The counts c are constants (no gradient), so the
loss is linear in the per-token probabilities: a micro-batch adds its own tokens' share, coef · E / (layers · T²) ·
Σ c_le P^mb_le, and the shares of all micro-batches and ranks sum to the global loss exactly, the split
independence of the objective's loss. What the shares need is the counts of the whole step before the first
backward: with one micro-batch per rank they are all-reduced after its forward; with more, a routing pass (no
gradient) over the step's micro-batches counts them first, one more forward per micro-batch. `aux_scope:
micro_batch` skips that pass: each micro-batch is balanced over its own tokens on all ranks (the counts all-reduced
per micro-batch, as the Qwen paper does without its accumulation buffer), and the step's loss is their mean.

The z-loss (ST-MoE) is coef_z · mean over layers and counted tokens of logsumexp(logits)², its mean over the global
batch's tokens, split-independent the same way.

transformers 5.23's `load_balancing_loss_func` applies one softmax to the routers' raw logits (no double softmax),
but it pools all layers into one mean before the product and counts padding unless given a mask; here each layer
is balanced on its own, over the tokens `aux_tokens` names: `real` (all but padding) or `supervised` (the tokens
whose own label is trained).

Metrics (every step, also with coefficient 0): `moe/aux_loss` (the global-batch value above, without the
coefficient; the logged `loss` is the objective's alone), `moe/z_loss`, and per layer the normalised entropy of the
expert load (`moe/load_entropy/layer<l>`: 1 = every expert gets the same share of tokens) and the most loaded
expert's share over the mean share (`moe/load_max/layer<l>`: 1 = balanced, E/k = one expert takes every token),
with their mean and max over layers as `moe/load_entropy` and `moe/load_max`.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from data.encode import IGNORE

TOKENS = ("real", "supervised")
SCOPES = ("global", "micro_batch")


@dataclass
class MoeSettings:
    """`stage.moe`: the router losses of a MoE model (ignored by dense families)."""

    aux_loss_coef: Optional[float] = None  # None: the model's text_config.router_aux_loss_coef
    z_loss_coef: float = 0.0
    aux_tokens: str = "real"  # real | supervised
    aux_scope: str = "global"  # global (exact, a routing pass when a rank has several micro-batches) | micro_batch

    def check(self) -> None:
        if self.aux_tokens not in TOKENS:
            raise ValueError(f"stage.moe.aux_tokens={self.aux_tokens!r}; choose one of {list(TOKENS)}")
        if self.aux_scope not in SCOPES:
            raise ValueError(f"stage.moe.aux_scope={self.aux_scope!r}; choose one of {list(SCOPES)}")
        for key in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"stage.moe.{key}={v}: must be a finite number >= 0")


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router) of each MoE layer: HF's `*TopKRouter` modules, whose forward returns (logits
    [tokens, E], top-k weights, top-k indices); their parents are the sparse MoE blocks."""
    out = []
    for name, m in model.named_modules():
        if type(m).__name__.endswith("TopKRouter"):
            layer = re.search(r"layers\.(\d+)\.", name)
            out.append((int(layer.group(1)) if layer else len(out), m))
    return out


def sparse_blocks(model: torch.nn.Module) -> set[type]:
    """The module classes of the sparse MoE blocks (a router's parent): ZeRO-3 leaf modules."""
    parents = {name.rsplit(".", 1)[0] for name, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")}
    return {type(model.get_submodule(p)) for p in parents}


class NoRouter:
    """A dense model: nothing to record, no loss, no metrics."""

    def begin(self, engine, micro: list[dict]) -> None:
        pass

    @contextmanager
    def watch(self, batch: dict):
        yield

    def loss(self):
        return 0.0

    def step_sums(self) -> dict:
        return {}


class RouterStats:
    """Records each MoE layer's routing during the training forwards of a step (the router logits the model step
    hands to `record`) and turns it into the micro-batch's share of the aux and z losses, and the step's metrics. The loop calls `begin(engine,
    micro)` once a step, runs each micro-batch's objective inside `watch(batch)`, adds `loss()` to what it
    back-propagates, and logs `step_sums()` after the optimizer step."""

    def __init__(self, model: torch.nn.Module, cfg: MoeSettings, text_config):
        cfg.check()
        self.cfg = cfg
        default = getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0
        self.coef = float(default if cfg.aux_loss_coef is None else cfg.aux_loss_coef)
        self.z_coef = float(cfg.z_loss_coef)
        found = routers(model)
        if not found:
            raise ValueError("stage.moe: the model has no MoE router (*TopKRouter module)")
        self.layers = [i for i, _ in found]
        self.E, self.k = text_config.num_experts, text_config.num_experts_per_tok
        self.model = model  # its `sp` (training/sp.py, set by the engine) slices rows under sequence parallelism
        model.router_logits_to = self.record  # the model step hands over each forward's router logits
        self._mask = None  # counted tokens [tokens] of the micro-batch being trained (set by watch)
        self._rec = None  # {slot: (counts, prob sums, z sum)} while recording a forward
        self._step = None  # this step's counts (global scope), the accumulated metrics
        self._counting = False  # the routing pass (no gradient) is recording
        self._taken = None  # the watched micro-batch's (counts, prob sums, z sums, tokens)

    # -- recording ---------------------------------------------------------------------------------------------
    def _token_mask(self, batch: dict) -> torch.Tensor:
        if self.cfg.aux_tokens == "real":
            return (batch["sample_ids"] >= 0).reshape(-1)
        return (batch["labels"] != IGNORE).reshape(-1)

    def _local(self) -> torch.Tensor:
        """The armed mask over the tokens the routers see: the whole micro-batch, or this SP rank's slice of its
        flattened row (training/sp.py pads the row to a multiple of the group size)."""
        mask, sp = self._mask, self.model.sp
        if sp is not None and mask.numel() == getattr(sp, "T", -1):
            mask = torch.nn.functional.pad(mask, (0, sp.Tp - sp.T))[sp.a:sp.b]
        return mask

    def record(self, router_logits) -> None:
        """The router logits of one forward ([tokens, E] per MoE layer, in the graph), from the model step
        (training/vlm.py `router_logits_to`). Kept inside `watch` for the training forward (grad enabled; not a
        LoRA policy's frozen reference, which runs the same routers without grad) and in the routing pass."""
        if self._rec is None or not (torch.is_grad_enabled() or self._counting):
            return
        mask = self._local()
        for j, logits in enumerate(router_logits):
            if mask.numel() != logits.shape[0]:
                raise RuntimeError(f"router logits of {logits.shape[0]} tokens for a micro-batch of {mask.numel()}")
            probs = torch.softmax(logits.float(), dim=-1)  # HF's router: top-k of the fp32 probabilities
            m = mask.float()
            psum = (probs * m[:, None]).sum(0)
            z = (torch.logsumexp(logits.float(), dim=-1).square() * m).sum() if self.z_coef else None
            with torch.no_grad():
                idx = probs.topk(self.k, dim=-1).indices
                counts = torch.bincount(idx[mask].reshape(-1), minlength=self.E).double()
            self._rec[j] = (counts, psum, z)

    def _stack(self, rec: dict, tokens: torch.Tensor):
        if len(rec) != len(self.layers):
            raise RuntimeError(f"the MoE routers ran {len(rec)} of {len(self.layers)} layers in this forward")
        counts = torch.stack([rec[j][0] for j in range(len(rec))])
        psum = torch.stack([rec[j][1] for j in range(len(rec))])
        z = torch.stack([rec[j][2] for j in range(len(rec))]) if self.z_coef else None
        return counts, psum, z, tokens

    def begin(self, engine, micro: list[dict]) -> None:
        """The step starts: with the global scope, a nonzero loss and several micro-batches per rank, a routing pass
        counts the whole step's tokens per expert first (no gradient; every rank runs as many micro-batches)."""
        self._step = {"counts": None, "micro": len(micro), "acc": None}
        if not (self.coef or self.z_coef) or self.cfg.aux_scope != "global" or len(micro) == 1:
            return
        total = None
        self._counting = True
        try:
            with torch.no_grad():
                for mb in micro:
                    mb = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
                    self._mask, self._rec = self._token_mask(mb), {}
                    engine(mb)
                    counts, _, _, _ = self._stack(self._rec, None)
                    part = torch.cat([counts.reshape(-1), self._local().sum().double().to(counts).reshape(1)])
                    total = part if total is None else total + part
        finally:
            self._mask, self._rec, self._counting = None, None, False
        self._step["counts"] = _all_sum(total)

    @contextmanager
    def watch(self, batch: dict):
        """Records the routers of the objective's forward of `batch`."""
        self._mask, self._rec = self._token_mask(batch), {}
        try:
            yield
            self._taken = self._stack(self._rec, self._local().sum().double())
        finally:
            self._rec = None

    def loss(self):
        """This rank's share of the step's aux (and z) loss, from the micro-batch just watched (differentiable)."""
        counts, psum, z, tokens = self._taken
        self._taken = None
        local = torch.cat([counts.reshape(-1), psum.detach().double().reshape(-1), tokens.reshape(1).to(counts),
                           *([z.detach().double().sum().reshape(1)] if z is not None else [])])
        st = self._step
        st["acc"] = local if st["acc"] is None else st["acc"] + local
        if not (self.coef or self.z_coef):
            return 0.0
        n_layers, E = len(self.layers), self.E
        if st["counts"] is not None:  # the routing pass counted the whole step
            total = st["counts"]
            scale = 1.0
        else:  # one micro-batch per rank (the whole step), or micro_batch scope (this micro-batch on every rank)
            total = _all_sum(torch.cat([counts.reshape(-1), tokens.reshape(1)]))
            scale = 1.0 if self.cfg.aux_scope == "global" else 1.0 / st["micro"]
        c, T = total[:-1].reshape(n_layers, E), float(total[-1])
        if T == 0:
            return psum.sum() * 0.0
        out = (self.coef * E / (n_layers * T * T)) * (c.to(psum.dtype) * psum).sum()
        if z is not None:
            out = out + (self.z_coef / (n_layers * T)) * z.sum()
        return out * scale

    def step_sums(self) -> dict:
        """{metric: [value, 1]} of the step's routing over all ranks (one all-reduce); the micro-batch is disarmed."""
        self._mask = None
        st, self._step = self._step, None
        if st is None or st["acc"] is None:  # a skipped step: no rank ran a forward
            return {}
        n_layers, E = len(self.layers), self.E
        acc = _all_sum(st["acc"])
        c = acc[:n_layers * E].reshape(n_layers, E)
        p = acc[n_layers * E:2 * n_layers * E].reshape(n_layers, E)
        T = float(acc[2 * n_layers * E])
        out = {}
        if T > 0:
            out["moe/aux_loss"] = float(E * (c * p).sum() / (n_layers * T * T))
            if self.z_coef:
                out["moe/z_loss"] = float(acc[2 * n_layers * E + 1] / (n_layers * T))
        share = c / c.sum(1, keepdim=True).clamp_min(1)
        entropy = -(share * share.clamp_min(1e-30).log()).sum(1) / math.log(E)
        peak = share.max(1).values * E
        for j, layer in enumerate(self.layers):
            out[f"moe/load_entropy/layer{layer}"] = float(entropy[j])
            out[f"moe/load_max/layer{layer}"] = float(peak[j])
        out["moe/load_entropy"] = float(entropy.mean())
        out["moe/load_max"] = float(peak.max())
        return {k: [v, 1.0] for k, v in out.items()}


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every process (data- and sequence-parallel ranks hold disjoint tokens), in float64."""
    t = t.double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def build(model: torch.nn.Module, family, cfg: MoeSettings, text_config):
    """RouterStats for a MoE family, NoRouter for a dense one."""
    return RouterStats(model, cfg, text_config) if family.moe else NoRouter()
