"""Next-token objective for every lm stage (pretraining documents, SFT chats).

The loss is computed here, not by the HF model: the HF loss averages per micro-batch, which makes the
gradient depend on how the global batch is split over ranks and accumulation steps. Here each token
carries a weight (token: 1, sample: 1/n_i, sqrt: n_i^-1/2, n_i the supervised tokens of its sample) and
the trainer divides by the weight sum of the whole global batch. The reduction is this objective's own key,
`stage.objective.loss_reduction` (DPO and RL weigh pairs and sequences, so it means nothing to them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.encode import IGNORE
from stages.objective import Objective, source_sums
from stages.rollout import per_sample

REDUCTIONS = ("token", "sample", "sqrt")


@dataclass
class Config:
    loss_reduction: str = "token"  # token | sample | sqrt

    def check(self) -> None:
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"stage.objective.loss_reduction={self.loss_reduction!r}; choose one of "
                             f"{list(REDUCTIONS)}")


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


class LMObjective(Objective):
    def __init__(self, cfg: Config):
        cfg.check()
        self.cfg = cfg

    def weights(self, batch: dict) -> torch.Tensor:
        return token_weights(batch["labels"], batch["sample_ids"], self.cfg.loss_reduction)

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Σ w·ℓ over the micro-batch (to be divided by the global weight sum) plus per-source CE sums."""
        loss, ce = model(batch, weights=batch["weights"])
        sums, counts = per_sample(ce, batch)  # sample id i comes from source sources[i]
        return loss, {"sums": source_sums(sums, counts, batch["sources"], "loss")}


def build(cfg: Config) -> LMObjective:
    return LMObjective(cfg)
