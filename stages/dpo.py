"""Direct preference optimisation and its variants (sigmoid/cDPO, ipo, hinge, robust, sigmoid_norm, RPO term).

A pair arrives as two samples of one micro-batch (meta kind chosen/rejected, same group, labels on the reply
only). log π(y|x) is the sum of the reply's token log-probs; ipo and sigmoid_norm divide the log-ratios by the
reply length, as trl does (and the IPO authors confirmed). Each pair weighs 1: `weights` gives 1 per pair and
the loop divides the summed pair losses by the pair count of the whole global batch, so the gradient does not
depend on the split over ranks and micro-batches. The loss formulas live in `pair_losses`, a pure function,
checked against trl's DPOTrainer in tests/test_dpo.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.objective import Context, Objective, frozen_forward
from stages.rollout import per_sample, token_logps

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
SAMPLE_KINDS = ("chosen", "rejected")  # encoded sample kinds it trains on (stages.needed_kinds)
REFERENCES = ("model",)


@dataclass
class Config:
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust | sigmoid_norm
    label_smoothing: float = 0.0  # sigmoid: cDPO; robust: the assumed flip rate; both need [0, 0.5)
    rpo_alpha: float = 0.0  # > 0 adds alpha * NLL(chosen)/|y_w| per pair (RPO)
    reference: str = "model"  # model: a frozen copy of the starting weights (the only reference)

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"stage.objective.loss={self.loss!r} is not a DPO loss; choose one of {list(LOSSES)}")
        if self.reference == "precomputed":  # record ref_logp never reached the batch; chosen/rejected shared a key
            raise ValueError("stage.objective.reference=precomputed was removed (it could not work); use "
                             "stage.objective.reference=model, the frozen starting weights")
        if self.reference not in REFERENCES:
            raise ValueError(f"stage.objective.reference={self.reference!r}; choose one of {list(REFERENCES)}")
        if self.beta <= 0:
            raise ValueError(f"stage.objective.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(f"stage.objective.label_smoothing applies to loss sigmoid (cDPO) or robust, "
                             f"not {self.loss!r}; set it to 0")
        if self.rpo_alpha < 0:
            raise ValueError(f"stage.objective.rpo_alpha={self.rpo_alpha} must be >= 0")


def pair_losses(cfg: Config, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor) -> torch.Tensor:
    """Per-pair preference loss from summed reply log-probs (policy and reference) and reply lengths."""
    beta, eps = cfg.beta, cfg.label_smoothing
    cr, rr = chosen - ref_chosen, rejected - ref_rejected
    if cfg.loss in ("ipo", "sigmoid_norm"):  # per-token log-ratios
        delta = cr / chosen_len.clamp(min=1) - rr / rejected_len.clamp(min=1)
    else:
        delta = cr - rr
    if cfg.loss == "sigmoid":  # eps > 0: conservative DPO (labels flipped with probability eps)
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if cfg.loss == "sigmoid_norm":
        return -F.logsigmoid(beta * delta)
    if cfg.loss == "hinge":
        return torch.relu(1 - beta * delta)
    if cfg.loss == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    # robust DPO: an unbiased estimate of the clean loss under flip rate eps
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen ids, rejected ids) of the micro-batch's pairs, ordered by group."""
    meta = batch.get("meta")
    if meta is None:
        raise ValueError("the dpo objective needs micro-batches with per-sample `meta` (kind chosen/rejected and "
                         "group, data/README.md); use a preference data source with the packer's micro-batches")
    by_group: dict = {}
    for sid, m in enumerate(meta):
        if m.get("kind") in ("chosen", "rejected"):
            by_group.setdefault(m["group"], {})[m["kind"]] = sid
    if not by_group:
        kinds = sorted({str(m.get("kind")) for m in meta})
        raise ValueError(f"dpo micro-batch holds no preference samples (sample kinds {kinds}): the stage's data has "
                         f"no preference records (chosen/rejected); point the stage at a preference source "
                         f"(stage.mixture / data.sources)")
    bad = [g for g, d in by_group.items() if len(d) != 2]
    if bad:
        keys = [meta[next(iter(by_group[g].values()))].get("key") for g in bad]
        raise ValueError(f"dpo micro-batch: samples {keys} lack their chosen/rejected partner; the "
                         f"packer must keep a preference group in one micro-batch")
    groups = sorted(by_group)
    return (torch.tensor([by_group[g]["chosen"] for g in groups]),
            torch.tensor([by_group[g]["rejected"] for g in groups]))


class DPOObjective(Objective):
    def __init__(self, cfg: Config):
        cfg.check()
        self.cfg = cfg
        self.ref = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        """The reference: the starting weights, frozen (Context.reference: rebuilt from the model config, exact on
        resume too, and placed like the policy by the engine; under LoRA the policy with its adapters off)."""
        self.ref = ctx.reference()

    # -- protocol ---------------------------------------------------------------------------------------------
    def weights(self, batch: dict) -> torch.Tensor:
        return torch.ones(len(pairs(batch)[0]))

    def frozen_pass(self, engine, micro: list[dict]) -> list[dict]:
        """Each micro-batch with `ref_logps`: the reference's summed log-probs per sample, from a forward-only pass
        of the reference over the step before the policy's (its own schedule on a pipeline)."""
        if self.ref is None:
            raise ValueError("the dpo objective has no reference model: the loop must call objective.setup(ctx) "
                             "after the engine exists")

        def ref_sums(batch):
            logps, _ = token_logps(self.ref, batch)
            return {"ref_logps": per_sample(logps, batch)[0].cpu()}

        return [{**mb, **stats} for mb, stats in zip(micro, frozen_forward(engine, micro, ref_sums, self.ref),
                                                      strict=True)]

    def loss_sum(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """Σ over the micro-batch's pairs of weight × (preference loss + RPO term), and the pair metrics."""
        c, r = pairs(batch)
        logps, ent = token_logps(engine, batch, entropy=True)
        sums, counts = per_sample(logps, batch)
        if "ref_logps" not in batch:  # evaluate() and direct callers: the reference's pass now
            (batch,) = self.frozen_pass(engine, [batch])
        ref_all = batch["ref_logps"].to(sums.device, sums.dtype)
        c, r = c.to(sums.device), r.to(sums.device)
        losses = pair_losses(self.cfg, sums[c], sums[r], ref_all[c], ref_all[r], counts[c], counts[r])
        total = losses
        if self.cfg.rpo_alpha:
            nll = -sums[c] / counts[c].clamp(min=1)
            total = losses + self.cfg.rpo_alpha * nll
        w = batch["weights"] if "weights" in batch else self.weights(batch)
        w = w.to(total.device, total.dtype)
        d = lambda x: x.detach()  # noqa: E731
        rc = self.cfg.beta * d(sums[c] - ref_all[c])
        rr = self.cfg.beta * d(sums[r] - ref_all[r])
        n = float(len(c))
        stats = {
            "dpo/loss": [float(d(losses).sum()), n], "rewards/chosen": [float(rc.sum()), n],
            "rewards/rejected": [float(rr.sum()), n], "rewards/margin": [float((rc - rr).sum()), n],
            "rewards/accuracy": [float((rc > rr).float().sum()), n],
            "logps/chosen": [float(d(sums[c]).sum()), n], "logps/rejected": [float(d(sums[r]).sum()), n],
            "entropy": [float(ent.sum()), float(counts.sum())],
        }
        sources = batch.get("sources") or ["default"] * len(batch["meta"])
        for k, ci in enumerate(c.tolist()):  # per-source loss per pair, named like the lm objective's
            acc = stats.setdefault(f"loss/{sources[ci]}", [0.0, 0.0])
            acc[0] += float(d(total[k]))
            acc[1] += 1.0
        if self.cfg.rpo_alpha:
            stats["rpo/nll"] = [float(d(nll).sum()), n]
        return (total * w).sum(), {"sums": stats}

    def evaluate(self, engine, micro: list[dict]) -> dict:
        """Held-out {metric: [sum, count]} over a step's micro-batches (no gradient): the training sums."""
        out: dict = {}
        with torch.no_grad():
            for batch in micro:
                for k, (s, n) in self.loss_sum(engine, batch)[1]["sums"].items():
                    acc = out.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + s, acc[1] + n
        return out


def build(cfg: Config) -> DPOObjective:
    return DPOObjective(cfg)
