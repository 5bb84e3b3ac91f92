"""Stage = data: trainable groups, objective (with its own keys, e.g. the lm loss reduction), sequence length,
optimizer, schedule.

The training loop never branches on a stage name; it asks `build_objective` for the loss of the
stage's objective kind and applies the stage's trainable groups and learning rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from training.lora import LoraSettings
from training.moe import MoeSettings


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0  # applied to matrices only, never to norms and biases
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.0  # fraction of max_steps; portable across run lengths
    min_lr_ratio: float = 0.1


@dataclass
class EvalSettings:
    """`stage.eval`: the stage's own loss on held-out samples every `every` optimizer steps (and at the last step),
    logged as `eval/loss/<source>` and `eval/loss`. Each source contributes its first `samples` samples, read in
    shard order (no shuffling), the same at every evaluation and after a resume. `sources`: with data=shards,
    `{name, urls}` mappings of held-out shards (keys as in data.sources); with data=shapes, shapes task names
    (read from the held-out split)."""

    every: int = 0  # 0: off
    samples: int = 32  # per source
    sources: list = field(default_factory=list)


@dataclass
class StageConfig:
    name: str = "s1_multimodal"
    trainable: list = field(default_factory=lambda: ["vision", "merger", "llm"])
    objective: Any = field(default_factory=lambda: {"name": "lm"})  # validated by the objective's own config
    seq_len: int = 8192
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_mult: dict = field(default_factory=lambda: {"vision": 1.0, "merger": 1.0, "llm": 1.0})
    mixture: Optional[dict] = None  # {data source: weight}; None = every source of `data=`
    lora: LoraSettings = field(default_factory=LoraSettings)  # r > 0: adapters train the groups it names
    eval: EvalSettings = field(default_factory=EvalSettings)  # held-out loss every N steps
    moe: MoeSettings = field(default_factory=MoeSettings)  # router losses of a MoE model (training/moe.py)


def build_objective(objective: dict):
    """The objective named by `stage.objective.name`, configured from the rest of that mapping."""
    registry = _objectives()
    objective = dict(objective)
    name = objective.pop("name", None)
    if name not in registry:
        raise ValueError(f"stage.objective.name={name!r} is unknown; choose one of {sorted(registry)}")
    module = registry[name]
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(module.Config), objective))
    except Exception as e:  # omegaconf names the bad key; say where it lives
        raise ValueError(f"stage.objective ({name}): {e}") from None
    return module.build(cfg)


def needed_kinds(objective: dict) -> Optional[tuple]:
    """The encoded sample kinds (data/encode.py `kind`) the objective trains on: its module's SAMPLE_KINDS, or
    None when any sample will do (lm) or the name is unknown (build_objective reports that)."""
    return getattr(_objectives().get(dict(objective).get("name")), "SAMPLE_KINDS", None)


def _objectives() -> dict:
    """stage.objective.name -> its module (imported on use: the modules import torch and the data code)."""
    from stages import distill, dpo, lm, sapo

    return {"lm": lm, "dpo": dpo, "sapo": sapo, "distill": distill}
