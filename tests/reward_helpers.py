"""User reward functions that tests register in config (stage.objective.rewards: {name: "reward_helpers:fn"})."""
from __future__ import annotations

from stages import rewards


def odd_length(completion: str, answer, **_) -> float:
    """Varies within a group on a random tiny model, so advantages are non-zero."""
    return float(len(rewards.clean(completion)) % 2)


def always_one(completion: str, answer) -> float:
    """Every rollout of every group earns the same reward: no group carries a signal."""
    return 1.0


def short_enough(completion: str, answer, limit: int = 3, *, bonus: float = 0.0, **extra) -> float:
    """Declares the options `limit` and `bonus`; anything else a record passes (even though **extra would take
    it) must be refused."""
    return float(len(rewards.clean(completion)) <= limit) + bonus
