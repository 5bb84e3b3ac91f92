"""One stage: build the components from their configs, train, checkpoint, export. No stage-specific code."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data.encode import IGNORE
from data.pipeline import DataConfig, Layout, Pipeline, eval_micro_batches, eval_source_configs, source_configs
from stages import StageConfig, build_objective
from stages.objective import Context
from training import engine as engines
from training import flops, lora, models, moe
from training.checkpoint import Checkpointer
from training.engine import EngineConfig
from training.metrics import LoggerConfig, Metrics
from training.parallel import ParallelConfig
from training.vlm import VLM

log = logging.getLogger("training")
DATA_COUNTERS = ("skipped/", "dropped/", "truncated/", "epoch/")  # data.pipeline.Chain.metrics() keys


@dataclass
class TrainerConfig:
    max_steps: int = 20
    micro_batch_size: int = 2
    grad_accum: int = 1
    save_every: int = 10  # also saved at the last step; 0 = only at the last step
    keep_checkpoints: int = 2
    seed: int = 0
    max_bad_steps: int = 3  # this many non-finite steps in a row abort the run (each one is skipped)


@dataclass
class JobConfig:
    model: models.ModelConfig = field(default_factory=models.ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/default"


def _sum(values: list[float], device) -> list[float]:
    """All-reduce (sum) a few floats in float64 so the logged totals do not depend on the world size."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _add_sums(into: dict, part: dict) -> None:
    """Adds {metric: [sum, count]} of `part` into `into`."""
    for k, (s, n) in part.items():
        acc = into.setdefault(k, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + s, acc[1] + n


def _gather_sums(sums: dict, counts: dict, own: bool = True) -> tuple[dict, dict]:
    """sum/count of each objective metric over all ranks (e.g. loss per source; keys may differ by rank), and
    the data counters (`skipped/<source>/<reason>`, ...) summed over ranks (`epoch/<source>`: the furthest rank's),
    in one collective (`own` as in _sum)."""
    parts = [(sums, counts) if own else ({}, {})]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (sums, counts))
    total: dict = {}
    data: dict = {}
    for part_sums, part_counts in parts:
        _add_sums(total, part_sums)
        for k, v in part_counts.items():
            data[k] = max(data.get(k, 0), int(v)) if k.startswith("epoch/") else data.get(k, 0) + int(v)
    return {k: s / n for k, (s, n) in sorted(total.items()) if n > 0}, dict(sorted(data.items()))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _StopOnSignal:
    """SIGTERM/SIGUSR1 (preemption, SLURM's --signal) and a first Ctrl-C ask for a checkpoint at the end of the
    current step; a second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signum is not None:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: checkpointing at the end of this step, then stopping (Ctrl-C again: stop now, "
                        "without a checkpoint)")
        self.signum = signum


@dataclass
class Run:
    """Everything one stage run holds after set-up."""

    job: JobConfig
    out: Path
    rank: int
    world: int
    bundle: models.Bundle
    model: VLM  # the step module over bundle.model (training/vlm.py)
    groups: dict  # parameter names per group (vision, merger, llm)
    loader: Pipeline
    objective: object
    engine: engines.Engine | None = None
    ckpt: Checkpointer | None = None
    metrics: Metrics | None = None
    flops: object = None  # training.flops.FlopModel
    peak_flops: float | None = None
    start: int = 0
    skipped_before: int = 0
    heldout: dict = field(default_factory=dict)  # stage.eval: {source: its micro-batches}, the same on every rank
    epochs: dict = field(default_factory=dict)  # epoch/<source> last logged (a line when a source wraps around)
    router: object = None  # training/moe.py RouterStats (MoE models) or NoRouter


def run(job: JobConfig, resolved_yaml: str, rank: int, world: int) -> dict | None:
    out = Path(job.output_dir)
    if (out / "DONE").is_file():
        log.info("%s/DONE exists: this stage already finished; nothing to do", out)
        return json.loads((out / "DONE").read_text())
    r = _setup(job, resolved_yaml, out, rank, world)
    if job.trainer.max_steps == 0:  # export the starting weights unchanged; no engine needed
        if rank == 0:
            models.export_hf(r.bundle, r.bundle.model.state_dict(), out / "hf")
        return _finish(out, rank, {"steps": 0, "final_loss": None})
    try:
        _start_engine(r, resolved_yaml)
        with _StopOnSignal() as stop:
            summary = _train(r, stop)
    finally:
        r.loader.close()  # loader workers ignore signals (data/pipeline.py); they stop here, after the checkpoint
        if r.metrics is not None:
            r.metrics.close()
    if summary.get("interrupted"):
        return summary
    state_dict = r.engine.full_state_dict(rank=0)
    if rank == 0:
        lora_cfg = r.job.stage.lora
        if lora_cfg.r:  # the export is the merged model; the adapter alone on request
            state_dict, adapter = lora.merged_state_dict(r.bundle, state_dict, lora_cfg)
        models.export_hf(r.bundle, state_dict, out / "hf")
        if lora_cfg.r and lora_cfg.save_adapter:
            lora.save_adapter(r.bundle, adapter, lora_cfg, out / "hf" / "adapter")
    return _finish(out, rank, summary)


def _setup(job: JobConfig, resolved_yaml: str, out: Path, rank: int, world: int) -> Run:
    tr, stage = job.trainer, job.stage  # the settings were checked by training.train.check_job
    replica = engines.replica_size(job.engine, job.parallel.sp_size)  # SP or TP groups: consecutive ranks
    dp_rank, dp_size = rank // replica, world // replica
    torch.manual_seed(tr.seed + dp_rank)  # the ranks of a replica draw the same numbers
    bundle = models.build(job.model)
    if stage.lora.r:  # adapters first: the groups then list their parameters too
        lora.inject(bundle.model, bundle.family, stage.lora)
    groups = models.param_groups(bundle.model, bundle.family)
    models.apply_trainable(bundle.model, groups, stage.trainable)
    if stage.lora.r:
        lora.train_adapters_only(bundle.model, groups, stage.lora)
    objective = build_objective(stage.objective)  # fails before any compute
    # one data stream per data-parallel rank: the ranks of an SP group read the same rows
    layout = Layout(rank=dp_rank, world=dp_size, micro_batch=tr.micro_batch_size, grad_accum=tr.grad_accum,
                    seq_len=stage.seq_len)
    if rank == 0:  # the shapes cache is generated once, before the other ranks read it
        source_configs(job.data, stage.mixture)
        if stage.eval.every:
            eval_source_configs(job.data, stage.eval.sources)
    if dist.is_initialized():
        dist.barrier()
    # the objective's own record checks (e.g. RL rewards must be registered) make a bad record a counted skip
    loader = Pipeline(job.data, stage.mixture, bundle, layout, check_sample=objective.check_sample)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(resolved_yaml)
    r = Run(job, out, rank, world, bundle, _vlm(job, bundle.model), groups, loader, objective)
    if stage.eval.every:
        r.heldout = _heldout(job, bundle, layout, objective)
    return r


def _heldout(job: JobConfig, bundle, layout: Layout, objective) -> dict:
    """stage.eval's micro-batches per source, built once (every rank builds all of them; see `_evaluate`)."""
    out = {}
    for src in eval_source_configs(job.data, job.stage.eval.sources):
        batches, counts = eval_micro_batches(src, job.data, bundle, layout, job.stage.eval.samples,
                                             objective.check_sample)
        n = sum(len(b["sources"]) for b in batches)
        lost = {k: v for k, v in counts.items() if k.startswith(("skipped/", "dropped/", "truncated/"))}
        if not batches:
            raise ValueError(f"stage.eval.sources: {src.name} gave no usable sample (urls {src.urls}; skipped: "
                             f"{lost or 'none'}); fix the held-out data or leave the source out")
        log.info("held-out %s: %d samples in %d micro-batch(es)%s", src.name, n, len(batches),
                 f"; skipped {lost}" if lost else "")
        out[src.name] = batches
    return out


def _vlm(job: JobConfig, hf) -> VLM:
    vlm = VLM(hf, job.model.loss_chunk)
    vlm.offload_activations = job.model.offload_activations
    return vlm


def frozen_model_config(model: "models.ModelConfig", path: str) -> "models.ModelConfig":
    """Another model (a teacher) loaded from `path` with the stage's loading settings (dtype, attention, pixel
    budgets), none of the student's own architecture or start (model.tiny, model.groups_from)."""
    return dataclasses.replace(model, name="frozen", path=path, gradient_checkpointing=False, tiny={},
                               groups_from={"path": None, "groups": []})


def _start_engine(r: Run, resolved_yaml: str) -> None:
    """The engine, metrics sinks, and the state of the latest checkpoint if there is one."""
    job, tr = r.job, r.job.trainer
    r.flops = flops.build(r.bundle.model, job.stage.trainable)  # of the HF model, before an engine replaces modules
    r.engine = engines.build(r.model, r.groups, job.stage, job.engine, tr.micro_batch_size, tr.grad_accum, r.world,
                             tr.max_steps, job.parallel, job.model.tiled_mlp)
    # a MoE model's routers as the engine runs them (HF's, or the megatron decoder's taps of the same outputs)
    r.router = moe.build(r.model, r.bundle.family, job.stage.moe, r.bundle.model.config.get_text_config())
    r.ckpt = Checkpointer(r.out / "checkpoints", r.rank, tr.keep_checkpoints)
    r.metrics = Metrics(job.logger, r.out, r.rank, tr.max_steps, config={"yaml": resolved_yaml})
    r.peak_flops = flops.peak_flops(job.engine.dtype)
    if job.stage.lora.r:  # the frozen base weights are the starting weights: no second copy
        reference = lambda: lora.AdapterOff(r.model)  # noqa: E731
    else:
        reference = lambda: r.engine.build_frozen(_vlm(job, models.build(job.model).model))  # noqa: E731

    def frozen(path: str):
        bundle = models.build(frozen_model_config(job.model, path))
        return bundle, r.engine.build_frozen(_vlm(job, bundle.model))

    r.objective.setup(Context(r.engine, r.bundle, reference, frozen))
    tag = r.ckpt.latest_tag()  # rank 0 decides; every rank resumes from the same checkpoint
    if tag is None:
        if (r.out / "metrics.jsonl").is_file():
            log.warning("no checkpoint in %s: starting over at step 1 (the rows an earlier attempt logged in "
                        "metrics.jsonl are dropped)", r.out / "checkpoints")
        else:
            log.info("no checkpoint in %s: starting from step 0", r.out / "checkpoints")
        r.metrics.start_over()  # rows of a run killed before its first checkpoint are not this run's
    else:
        state = r.ckpt.load(r.engine, tag)
        r.start, r.skipped_before = state["step"], state.get("skipped_steps", 0)
        r.loader.load_state_dict(state["data"])
        r.objective.load_state_dict(state.get("objective", {}))
        r.epochs = state.get("epochs", {})
        r.metrics.truncate_after(r.start)
        log.info("resumed from %s at step %d", r.out / "checkpoints" / tag, r.start)


def _train(r: Run, stop: _StopOnSignal) -> dict:
    """The loop: one optimizer step per iteration, metrics, checkpoints, the bad-step guard."""
    tr = r.job.trainer
    loss, tokens_seen, bad_in_row, skipped, data_counts = None, 0.0, 0, 0, {}
    for step in range(r.start, tr.max_steps):
        row, stopping = _step(r, step, stop)
        tokens_seen += row["tokens"]
        if row["skipped"]:
            skipped += 1
            bad_in_row += 1
            log.warning("step %d skipped (%s); %d in a row", step + 1, row["skipped"], bad_in_row)
            if row["skipped"] == "non-finite" and bad_in_row >= tr.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient (last: step "
                    f"{step + 1}); stopping. The last good checkpoint in {r.out / 'checkpoints'} is kept; lower "
                    f"the learning rate or inspect the data, then re-run (or raise trainer.max_bad_steps)")
        else:
            bad_in_row, loss = 0, row["loss"]
        row["skipped_steps"] = skipped + r.skipped_before
        ev = r.job.stage.eval
        if ev.every and ((step + 1) % ev.every == 0 or step + 1 == tr.max_steps):
            row.update(_evaluate(r))
        data_counts = {k: v for k, v in row.items() if k.startswith(DATA_COUNTERS)}
        _log_wraps(r, row)
        r.metrics.log(row, r.start)
        if "eval/loss" in row and r.rank == 0:
            log.info("step %d: held-out loss %.4f (%s)", step + 1, row["eval/loss"], ", ".join(
                f"{k.removeprefix('eval/loss/')} {v:.4f}" for k, v in row.items() if k.startswith("eval/loss/")))
        if (tr.save_every and (step + 1) % tr.save_every == 0) or step + 1 == tr.max_steps or stopping:
            r.ckpt.save(r.engine, step + 1, {"step": step + 1, "data": r.loader.state_dict(),
                                             "skipped_steps": row["skipped_steps"],
                                             "objective": r.objective.state_dict(), "epochs": r.epochs})
        if stopping:
            log.warning("stopping on a signal: checkpoint written at step %d; re-run the same command to resume",
                        step + 1)
            return {"interrupted": True, "step": step + 1}
    return {"steps": tr.max_steps, "final_loss": loss, "tokens": tokens_seen, "skipped_steps": skipped,
            **data_counts}


def _step(r: Run, step: int, stop: _StopOnSignal) -> tuple[dict, bool]:
    """One optimizer step: the step's micro-batches, the global weight sum, forward/backward, step."""
    stage, engine, world, obj = r.job.stage, r.engine, r.world, r.objective
    own = float(engine.replica_rank == 0)  # an SP group's ranks hold the same rows: its data and metrics count once
    t0 = time.time()
    # learning rates this step uses; "lr" is the stage's base lr (group lr / its multiplier)
    lrs = {f"lr/{g['name']}": g["lr"] for g in engine.param_groups}
    g0 = engine.param_groups[0]
    base_lr = g0["lr"] / float(stage.lr_mult.get(g0["group"], 1.0))
    micro = r.loader.next_step()
    t_data = time.time() - t0
    micro = obj.prepare(engine, micro)  # RL: rollouts replace the prompts
    micro = obj.frozen_pass(engine, micro)  # a reference's log-probs (DPO), before the policy's calls
    for mb in micro:
        mb["weights"] = obj.weights(mb)
    # the global weight sum over all ranks and micro-batches: the gradient is then split-independent
    (weight_sum,) = _sum([own * float(sum(mb["weights"].sum() for mb in micro))], engine.device)
    # the loss stays on the device until the step's one all-reduce: no host sync per micro-batch
    loss_sum, sums, skipped, norm = torch.zeros((), dtype=torch.float64, device=engine.device), {}, None, None
    if weight_sum > 0:
        r.router.begin(engine, micro)  # a MoE model's load balancing counts the whole step's routing

        def micro_step(mb):  # + this micro-batch's router-loss share
            with r.router.watch(mb):
                ls, stats = obj.loss_sum(engine, mb)
            return ls * (1.0 / weight_sum) + r.router.loss(), ls, stats

        for ls, stats in engine.forward_backward(micro, micro_step):
            loss_sum += ls.double().to(loss_sum.device)
            _add_sums(sums, stats.get("sums", {}))
        norm, bad = engine.step()
    else:  # every rank sees the same global sum, so every rank skips together; no collective is left half-done
        skipped, bad = "no supervised tokens in the global batch", False
    _add_sums(sums, obj.step_sums())  # metrics of work done this step whether or not it trained (RL rollouts)
    _add_sums(sums, r.router.step_sums())  # moe/aux_loss, moe/load_* (MoE models)
    tok = sum(float((mb["sample_ids"] >= 0).sum()) for mb in micro)
    sup = sum(float((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro)
    n_samples = sum(len(mb["sources"]) for mb in micro)
    flops = sum(r.flops.micro_batch(mb) for mb in micro)
    # the stop flag rides on this all-reduce, so every rank sees a signal any rank got
    loss_sum, tok, sup, n_samples, flops, stopping = _sum(
        [own * float(loss_sum), own * tok, own * sup, own * n_samples, own * flops, float(stop.signum is not None)],
        engine.device)
    loss = loss_sum / weight_sum if weight_sum > 0 else None
    if skipped is None and (bad or not math.isfinite(loss)):
        if not bad:
            raise RuntimeError(
                f"step {step + 1}: non-finite loss but the engine applied the update (DeepSpeed checks gradients "
                f"only when clipping is on or in bf16); set stage.optimizer.grad_clip > 0. The last good checkpoint "
                f"in {r.out / 'checkpoints'} is kept")
        skipped, loss = "non-finite", None
    dt = time.time() - t0
    row = {"step": step + 1, "loss": loss, "lr": base_lr, "tokens": tok, "samples": n_samples,
           "supervised_tokens": sup, "tokens_per_s": tok / dt, "samples_per_s": n_samples / dt,
           "step_time_s": dt, "data_wait_frac": t_data / dt, "flops_per_s": flops / world / dt,
           "grad_norm": _finite_or_none(norm) if not skipped else None,
           "peak_mem_gb": _peak_mem_gb(), "skipped": skipped}
    if r.peak_flops:
        row["mfu"] = flops / world / dt / r.peak_flops
    row.update(lrs)
    means, counts = _gather_sums(sums, r.loader.metrics(), bool(own))
    row.update(means)
    row.update(counts)  # cumulative skipped/dropped/truncated samples per source and reason, all ranks
    return row, bool(stopping)


def _evaluate(r: Run) -> dict:
    """stage.eval: the objective's own loss on the held-out micro-batches, in eval mode and without gradients:
    `eval/loss/<source>` (Σ loss_sum / Σ weights over the source) and `eval/loss` over all of them. The values do
    not depend on the world size. A source's micro-batches are dealt round-robin over the data-parallel ranks; a
    rank with one fewer runs one again, uncounted, so that every rank makes the same module calls (each is a
    collective under ZeRO-3, and the ranks of an SP group share each row)."""
    engine, obj, t0 = r.engine, r.objective, time.time()
    own = float(engine.replica_rank == 0)
    totals = []
    was_training = engine.model.training
    engine.model.train(False)
    try:
        with torch.no_grad():
            for batches in r.heldout.values():
                mine = batches[engine.dp_rank::engine.dp_size] or batches[:1]
                counted = len(batches[engine.dp_rank::engine.dp_size])
                loss = weight = 0.0
                for i in range(-(-len(batches) // engine.dp_size)):
                    (mb,) = obj.frozen_pass(engine, [dict(mine[min(i, len(mine) - 1)])])
                    mb["weights"] = obj.weights(mb)
                    # one micro-batch at a time (a pipeline's schedule takes one shape; the last may have fewer rows)
                    ((ls, _),) = engine.forward_backward([mb], lambda b: (None, *obj.loss_sum(engine, b)),
                                                         forward_only=True)
                    if i < counted:
                        loss, weight = loss + float(ls), weight + float(mb["weights"].sum())
                totals += [own * loss, own * weight]
    finally:
        engine.model.train(was_training)
    totals = _sum(totals, engine.device)
    losses, weights = totals[0::2], totals[1::2]
    out = {f"eval/loss/{name}": l / w for name, l, w in zip(r.heldout, losses, weights) if w > 0}
    if sum(weights) > 0:
        out["eval/loss"] = sum(losses) / sum(weights)
    out["eval_time_s"] = time.time() - t0
    return out


def _log_wraps(r: Run, row: dict) -> None:
    """One line when a data source starts another pass over its shards (`epoch/<source>` goes up)."""
    for k, v in row.items():
        if k.startswith("epoch/") and v > r.epochs.get(k, 0):
            r.epochs[k] = v
            if r.rank == 0:
                log.info("data source %s: all its shards read %d time(s) by step %d; it starts over (%s=%d)",
                         k.removeprefix("epoch/"), v, row["step"], k, v)


def _finite_or_none(x) -> float | None:
    x = float(x) if x is not None else None
    return x if x is not None and math.isfinite(x) else None


def _peak_mem_gb() -> float:
    """Accelerator peak allocated memory, or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _finish(out: Path, rank: int, summary: dict) -> dict:
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        summary["hf"] = str(out / "hf")
        (out / "DONE").write_text(json.dumps(summary, indent=1) + "\n")  # written last of all
    return summary
