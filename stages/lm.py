"""Next-token objective for every lm stage (pretraining documents, SFT chats).

The loss is computed here, not by the HF model: the HF loss averages per micro-batch, which makes the
gradient depend on how the global batch is split over ranks and accumulation steps. Here each token
carries a weight (token: 1, sample: 1/n_i, sqrt: n_i^-1/2, n_i the supervised tokens of its sample) and
the trainer divides by the weight sum of the whole global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.encode import IGNORE
from stages import forward

REDUCTIONS = ("token", "sample", "sqrt")


@dataclass
class Config:
    pass


def token_weights(labels: torch.Tensor, sample_ids: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weights of the shifted targets labels[:, 1:]; zero where unsupervised."""
    target = labels[:, 1:]
    sid = sample_ids[:, 1:]
    sup = target != IGNORE
    if reduction == "token":
        return sup.float()
    # n_i: supervised targets of each sample (ids are unique within the micro-batch)
    flat = torch.where(sup, sid, torch.full_like(sid, -1)).flatten()
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=int(sid.max()) + 1 if sid.numel() else 1).float()
    n = torch.zeros_like(target, dtype=torch.float)
    n[sup] = counts[sid[sup]]
    power = 1.0 if reduction == "sample" else 0.5
    w = torch.zeros_like(n)
    w[sup] = n[sup].pow(-power)
    return w


class LMObjective:
    def __init__(self, cfg: Config, reduction: str):
        if reduction not in REDUCTIONS:
            raise ValueError(f"stage.loss_reduction={reduction!r}; choose one of {list(REDUCTIONS)}")
        self.cfg, self.reduction = cfg, reduction

    def weights(self, batch: dict) -> torch.Tensor:
        return token_weights(batch["labels"], batch["sample_ids"], self.reduction)

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Σ w·ℓ over the micro-batch (to be divided by the global weight sum) plus per-source CE sums."""
        logits, zero = forward.logits(model, batch)
        target = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                             reduction="none").view_as(target)
        sup = target != IGNORE
        sid = batch["sample_ids"][:, 1:]
        ce_d = ce.detach()
        sums: dict[str, list[float]] = {}
        for i, src in enumerate(batch["sources"]):  # sample id i comes from source sources[i]
            m = sup & (sid == i)
            s = sums.setdefault(f"loss/{src}", [0.0, 0.0])
            s[0] += float(ce_d[m].sum())
            s[1] += float(m.sum())
        return (ce * batch["weights"]).sum() + zero, {"sums": sums}


def build(cfg: Config, reduction: str) -> LMObjective:
    return LMObjective(cfg, reduction)
