"""The Objective protocol: what the training loop asks of a stage's loss, with defaults for the optional parts.

The loop calls, per optimizer step: `prepare(model, micro)` (RL: rollouts replace the prompts), `frozen_pass(engine,
micro)` (values of frozen models the loss reads, computed before the policy's calls; held-out batches get it too), `weights(batch)`
per micro-batch (the loop divides by the global sum), `loss_sum(model, batch)` -> (Σ weight × loss, {"sums":
{metric: [sum, count]}}), then `step_sums()` (metrics of work done this step whether or not it trained). The
loader calls `check_sample(sample)` on each encoded sample (raise data.errors.BadSample to skip it, counted).
`state_dict`/`load_state_dict` ride in the checkpoint. `setup(ctx)` runs once the engine exists, with only what an
objective may need (`Context`), not the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Context:
    """What an objective's set-up sees: the engine (its device, process groups), the model bundle (tokenizer,
    family), `reference()`: the stage's starting weights, frozen, as a step callable (a copy placed by the engine,
    sharded under ZeRO-3; under LoRA the policy with its adapters switched off, no second copy), and `frozen(path)`:
    another model (a teacher) loaded like `model.path`, frozen and placed the same way: (its Bundle, step callable)."""

    engine: object  # training.engine.Engine
    bundle: object  # training.models.Bundle
    reference: Callable[[], Callable]
    frozen: Callable[[str], tuple] = None


def frozen_forward(engine, micro: list[dict], fn, model) -> list[dict]:
    """[fn(micro-batch)] (a dict, which may hold tensors) with no gradient, where `fn` calls the frozen `model`: the
    engine's forward-only pass over `model`'s pipeline (Engine.forward_backward; the results reach every stage), or
    plain calls when `engine` is a bare step module (tools and unit tests call objectives on one)."""
    with torch.no_grad():
        if not hasattr(engine, "forward_backward"):
            return [fn(mb) for mb in micro]
        step = lambda batch: (None, torch.zeros((), dtype=torch.float64), fn(batch))  # noqa: E731 (no loss)
        return [stats for _, stats in engine.forward_backward(micro, step, forward_only=True, model=model)]


class Objective:
    """Base class with the protocol's defaults; `weights` and `loss_sum` are the objective's own."""

    # None: runs under sequence parallelism (its batches are packed rows); else why it cannot
    no_sequence_parallel: str | None = None
    # None: stage.eval can score held-out samples with `loss_sum` (no gradient); else why it cannot
    no_eval: str | None = None
    # None: `loss_sum` is one call of the policy (frozen models run in `frozen_pass`), so it runs on a pipeline's
    # last stage (engine=megatron, engine.pp > 1); else why it cannot
    no_pipeline: str | None = None

    def setup(self, ctx: Context) -> None:
        pass

    def check_sample(self, sample: dict) -> None:
        pass

    def prepare(self, model, micro: list[dict]) -> list[dict]:
        return micro

    def frozen_pass(self, engine, micro: list[dict]) -> list[dict]:
        """The micro-batches with what frozen models (a reference) contribute to the loss added, from a pass of their
        own before the policy's: on a pipeline (engine=megatron, engine.pp > 1) a frozen model cannot run inside the
        policy's loss on the last stage, so it runs its own forward-only schedule (`Engine.forward_backward(...,
        model=)`)."""
        return micro

    def weights(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def step_sums(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def source_sums(values: torch.Tensor, counts: torch.Tensor, sample_source: list[str], prefix: str) -> dict:
    """{prefix/source: [sum, count]} from per-sample sums and counts (one host transfer for the micro-batch)."""
    names = sorted(set(sample_source))
    idx = torch.tensor([names.index(s) for s in sample_source], device=values.device)
    v = torch.zeros(len(names), dtype=torch.float64, device=values.device).index_add_(0, idx, values.double())
    c = torch.zeros(len(names), dtype=torch.float64, device=values.device).index_add_(0, idx, counts.double())
    return {f"{prefix}/{n}": [s, k] for n, s, k in zip(names, v.tolist(), c.tolist())}
