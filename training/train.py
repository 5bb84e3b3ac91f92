"""Hydra entry point for one stage: `python -m training.train stage=... model=... [overrides]`.

Hydra stays here: the composed config is turned into plain dataclasses once (unknown keys fail), and the
process layout (rank, world size) is read from the launcher's environment once and passed down.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("training")


def to_job(cfg: DictConfig):
    """DictConfig -> JobConfig; a key that a component's dataclass does not know is a clear error."""
    from training.loop import JobConfig

    schema = OmegaConf.structured(JobConfig)
    for key in cfg:
        if key not in schema:
            raise ValueError(f"unknown top-level config key {key!r}; known: {sorted(schema.keys())}")
    if "stage" in cfg and "loss_reduction" in cfg.stage:
        raise ValueError(f"stage.loss_reduction={cfg.stage.loss_reduction} moved to the lm objective: set "
                         f"stage.objective.loss_reduction={cfg.stage.loss_reduction} (DPO and RL weigh pairs and "
                         f"sequences and have no reduction)")
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as e:  # omegaconf's message names the key and the dataclass
        raise ValueError(f"invalid config: {e}".replace("\n", " | ")) from None
    return OmegaConf.to_object(merged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Joins the process group torchrun (or SLURM via torchrun) set up; a plain `python` run is world 1."""
    import torch

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from training import console, engine

    with console.stdout_to_log():  # DeepSpeed prints its op builds ("... built successfully"): train.log only
        engine.init_distributed()
    console.route_to_root("DeepSpeed")  # DeepSpeed's warnings: console and train.log (training/console.py)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def check_job(job, world: int) -> None:
    """Settings that can never work fail here, before a model is built or a step runs, with a ValueError that
    names the key and the fix. Pure checks of the typed config; the data probe is `check_sample_lengths`."""
    from training import engine, models

    tr, stage = job.trainer, job.stage
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(tr, key) < 1:
            raise ValueError(f"trainer.{key}={getattr(tr, key)} must be at least 1")
    if tr.max_steps < 0:
        raise ValueError(f"trainer.max_steps={tr.max_steps} must be >= 0 (0 exports the starting model)")
    family = models.get_family(job.model.family)
    if not stage.trainable:
        raise ValueError(f"stage.trainable is empty: stage {stage.name!r} would train nothing; name at least one "
                         f"of {models.describe_groups(family.leaf_groups)} (e.g. stage.trainable=[merger,llm])")
    for key, names in (("stage.trainable", stage.trainable), ("stage.lr_mult", list(stage.lr_mult))):
        try:  # the groups of this model: router / experts / dense only where the family splits its llm
            models.leaf_groups(names, family.leaf_groups, key)
        except ValueError as e:
            raise ValueError(f"{e} for model.family={family.name}") from None
    stage.moe.check()
    if stage.seq_len < 1:
        raise ValueError(f"stage.seq_len={stage.seq_len} must be >= 1 (tokens per packed row)")
    _check_optimization(stage)
    trained = models.leaf_groups(stage.trainable, family.leaf_groups)
    if all(models.lr_mult_of(g, stage.lr_mult)[1] == 0 for g in trained):
        raise ValueError(f"stage.lr_mult is 0 for every group of stage.trainable={list(stage.trainable)}: stage "
                         f"{stage.name!r} would change nothing; give one of them a multiplier > 0")
    from training import lora

    lora.check(stage.lora, list(stage.trainable), family.leaf_groups)
    if job.data.name != "shapes":  # shards: the entries of data.sources and stage.mixture (reads no file)
        from data.pipeline import source_configs

        source_configs(job.data, stage.mixture)
    _check_eval(job)
    _check_parallel(job, world)
    if job.engine.kind == "megatron":
        _check_megatron(job, world)
    # the engine's own: zero stage, dtype, offload combinations, engine.raw batch keys vs trainer.* and the world
    engine.check(job.engine, tr.micro_batch_size, tr.grad_accum, world, stage.optimizer.grad_clip)


def _check_eval(job) -> None:
    """stage.eval: its numbers, its sources' entries (no file read) and whether the objective can be evaluated."""
    from data.pipeline import eval_source_configs
    from stages import build_objective

    ev = job.stage.eval
    if ev.every < 0 or ev.samples < 1:
        raise ValueError(f"stage.eval: every={ev.every} must be >= 0 (0: off) and samples={ev.samples} >= 1")
    if not ev.every:
        return
    if not ev.sources:
        example = "[vqa, caption]" if job.data.name == "shapes" else "[{name: val, urls: '/data/val-{0000..0003}.tar'}]"
        raise ValueError(f"stage.eval.every={ev.every} needs stage.eval.sources, the held-out data (e.g. "
                         f"stage.eval.sources='{example}'); or set stage.eval.every=0")
    why = build_objective(job.stage.objective).no_eval
    if why:
        raise ValueError(f"stage.eval: the {job.stage.objective['name']} objective has no held-out loss ({why}); set "
                         f"stage.eval.every=0 for stage {job.stage.name!r}")
    eval_source_configs(job.data, ev.sources, generate=False)


def _check_parallel(job, world: int) -> None:
    """parallel.*: the SP size against the processes, the model's attention heads and the objective."""
    from stages import build_objective
    from training import parallel

    text = _text_config(job.model)  # None: model.path is an earlier step's export, checked when this step starts
    heads = (text["num_attention_heads"], text["num_key_value_heads"]) if text else None
    parallel.check(job.parallel, world, heads)
    if job.parallel.sp_size > 1:
        from training.attention import VARLEN

        if job.model.attn_implementation not in VARLEN:
            raise ValueError(f"parallel.sp_size={job.parallel.sp_size} needs a varlen attention (packed rows cut by "
                             f"cu_seqlens, attention on the whole row after the all-to-all): set "
                             f"model.attn_implementation to one of {list(VARLEN)}, not "
                             f"{job.model.attn_implementation!r}")
        why = build_objective(job.stage.objective).no_sequence_parallel
        if why:
            raise ValueError(f"parallel.sp_size={job.parallel.sp_size}: the {job.stage.objective['name']} objective "
                             f"cannot run sequence-parallel ({why}); set parallel.sp_size=1 for stage "
                             f"{job.stage.name!r}")
    if job.model.tiled_mlp < 0:
        raise ValueError(f"model.tiled_mlp={job.model.tiled_mlp} must be >= 0 (0/1: off; N: N sequence shards)")
    from training import models

    if job.model.tiled_mlp > 1 and models.get_family(job.model.family).moe:
        # DeepSpeed's TiledMLP recomputes each shard in backward as a 2-D [tokens, hidden] tensor, and HF's sparse
        # MoE block unpacks a 3-D input (batch, seq, hidden): it would fail at the first backward
        raise ValueError(f"model.tiled_mlp={job.model.tiled_mlp}: DeepSpeed's TiledMLP does not run the "
                         f"{job.model.family} MoE blocks yet (their forward takes [batch, seq, hidden], TiledMLP's "
                         f"backward passes [tokens, hidden]); set model.tiled_mlp=0")


def _check_megatron(job, world: int) -> None:
    """engine=megatron: what its decoder does not run yet, before a model is built."""
    from training import models
    from training.attention import VARLEN

    if models.get_family(job.model.family).moe and (job.engine.tp > 1 or job.engine.pp > 1):
        raise ValueError(f"engine=megatron: model.family={job.model.family} runs its experts with expert parallelism "
                         f"(engine.ep) at engine.tp=1 and engine.pp=1 (megatron's MoE layer needs TP sequence "
                         f"parallelism at tp > 1; MoE pipelines are untested); got tp={job.engine.tp}, "
                         f"pp={job.engine.pp}")
    if job.stage.lora.r:
        raise ValueError("engine=megatron: stage.lora adapts HF modules, which the megatron decoder replaces; set "
                         "stage.lora.r=0 or use a DeepSpeed engine")
    if job.parallel.sp_size != 1 or job.model.tiled_mlp > 1:
        raise ValueError("engine=megatron: parallel.sp_size and model.tiled_mlp are the DeepSpeed engine's long-context "
                         "levers; set parallel.sp_size=1 and model.tiled_mlp=0 there")
    if job.model.attn_implementation not in VARLEN:
        raise ValueError(f"engine=megatron takes packed rows by cu_seqlens: set model.attn_implementation to one of "
                         f"{list(VARLEN)}, not {job.model.attn_implementation!r}")
    text, tp, pp = _text_config(job.model), job.engine.tp, job.engine.pp  # the decoder's whole check: at its build
    if text:
        from training.mcore.model import check_tp

        heads = text["num_attention_heads"]
        check_tp(tp, heads, text["num_key_value_heads"], text.get("head_dim") or text["hidden_size"] // heads,
                 text["intermediate_size"], what=f"engine.tp={tp}")
        vpp = job.engine.vpp
        if text["num_hidden_layers"] % (pp * vpp):
            raise ValueError(f"engine.pp={pp} x engine.vpp={vpp}: the {text['num_hidden_layers']} decoder layers must "
                             f"split evenly over the (virtual) pipeline stages; choose pp x vpp dividing "
                             f"{text['num_hidden_layers']}")
    if pp > 1:
        from stages import build_objective

        why = build_objective(job.stage.objective).no_pipeline
        if why:
            raise ValueError(f"engine.pp={pp}: the {job.stage.objective['name']} objective does not run on a pipeline "
                             f"yet ({why}); set engine.pp=1 for stage {job.stage.name!r} (engine.tp still applies)")



def _text_config(cfg) -> dict | None:
    """The decoder's config numbers of `model=` without building it: the tiny preset's, or config.json's; None
    while model.path does not exist yet (a recipe step whose model is an earlier step's export)."""
    import json

    from training import models

    if cfg.path is None:
        return dict(models.get_family(cfg.family).tiny_text)
    path = Path(cfg.path) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("text_config", data)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_optimization(stage) -> None:
    """stage.optimizer, stage.lr_mult and stage.schedule (training/engine.py): values torch or the schedule would
    reject late, or silently misuse, fail with the key."""
    opt, sch = stage.optimizer, stage.schedule
    for key, ok, need in (("lr", _number(opt.lr) and opt.lr > 0, "a finite number > 0 (e.g. 1e-5)"),
                          ("weight_decay", _number(opt.weight_decay) and opt.weight_decay >= 0, "a number >= 0"),
                          ("eps", _number(opt.eps) and opt.eps > 0, "a number > 0 (e.g. 1e-8)"),
                          ("grad_clip", _number(opt.grad_clip) and opt.grad_clip >= 0, "a number >= 0 (0: off)")):
        if not ok:
            raise ValueError(f"stage.optimizer.{key}={getattr(opt, key)} must be {need}")
    betas = list(opt.betas) if isinstance(opt.betas, (list, tuple)) else None
    if betas is None or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"stage.optimizer.betas={opt.betas} must be two numbers in [0, 1), e.g. "
                         f"stage.optimizer.betas=[0.9,0.95]")
    for group, mult in stage.lr_mult.items():
        if not (_number(mult) and mult >= 0):
            raise ValueError(f"stage.lr_mult.{group}={mult} must be a finite number >= 0 (the group's lr is "
                             f"stage.optimizer.lr times it; leave the group out of stage.trainable to freeze it)")
    kinds = ("cosine", "linear", "constant")
    if sch.kind not in kinds:
        raise ValueError(f"stage.schedule.kind={sch.kind!r} is unknown; choose one of {list(kinds)}")
    if not (_number(sch.warmup_ratio) and 0 <= sch.warmup_ratio < 1):
        raise ValueError(f"stage.schedule.warmup_ratio={sch.warmup_ratio} must be in [0, 1) (a fraction of "
                         f"trainer.max_steps)")
    if not (_number(sch.min_lr_ratio) and 0 <= sch.min_lr_ratio <= 1):
        raise ValueError(f"stage.schedule.min_lr_ratio={sch.min_lr_ratio} must be in [0, 1] (the final lr as a "
                         f"fraction of stage.optimizer.lr)")


PROBE_SAMPLES = 16  # first samples of each data source encoded by the seq_len check


def _probe_bundle(cfg):
    """Tokenizer and image processor of `model=` without loading real weights: a tiny preset is simply built
    (a fraction of a second); an HF directory gives its processors; a training checkpoint -> None (not probed)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from training import models

    if cfg.path is None:
        return models.build(cfg)
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        return None
    family = models.get_family(cfg.family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = (models.ASSETS / "chat_templates" / family.chat_template).read_text()
    return models.Bundle(family, None, tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path))


def check_sample_lengths(job, rank: int) -> None:
    """stage.seq_len against the data: the first PROBE_SAMPLES of each source are encoded and offered to a
    packer with the run's seq_len and overlong policy. A source none of whose samples fits a row is an error
    here, before any compute, rather than after data.max_skips_in_row fruitless pulls in the loader (a source
    that is only partly too long loses those samples, counted as dropped/<source>/too_long; a warning). The
    same samples' kinds are checked against the objective's (`_check_sample_kinds`)."""
    import torch
    import torch.distributed as dist

    from data.encode import build_encoder
    from data.errors import BadSample
    from data.pack import PackConfig
    from data.pipeline import source_configs
    from data.shards import SourceConfig

    stage, data = job.stage, job.data
    bundle = _probe_bundle(job.model)
    if bundle is None:
        log.info("seq_len probe skipped: model.path=%s has no config.json (a training checkpoint, or missing: the "
                 "model build checks it)", job.model.path)
        return
    if rank == 0:  # generates the shapes cache once, before the other ranks read it (as the loop does)
        sources = source_configs(data, stage.mixture)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        sources = source_configs(data, stage.mixture)
    encoder = build_encoder(data.encoder, bundle, max_video_frames=data.max_video_frames)  # the loader's limits
    none_fit, some_dropped, kinds = {}, {}, {}
    for src in sources:
        it = SourceConfig(**{**src.__dict__, "shuffle_buffer": 0,  # the first samples, in order
                             "max_member_bytes": data.max_member_bytes if src.max_member_bytes is None
                             else src.max_member_bytes}).build(0, 1, 0, 1)
        packer = PackConfig(seq_len=stage.seq_len, buffer_size=1, overlong=data.overlong).build()
        lengths, fit, kinds[src.name] = [], 0, set()
        try:
            for _ in range(PROBE_SAMPLES):
                try:
                    units = encoder.encode({**next(it), "source": src.name})
                except BadSample:
                    continue
                except StopIteration:
                    break
                for u in units:  # lengths are all the packer looks at; M-RoPE ids are not needed for that
                    u.setdefault("position_ids", torch.zeros(3, len(u["input_ids"]), dtype=torch.long))
                kinds[src.name].update(u["kind"] for u in units)
                dropped = _dropped(packer)
                packer.add(units)
                lengths.append(sum(len(u["input_ids"]) for u in units))
                fit += _dropped(packer) == dropped
        finally:
            it.close()
        if lengths and not fit:
            none_fit[src.name] = (min(lengths), max(lengths))
        elif fit < len(lengths):
            some_dropped[src.name] = (len(lengths) - fit, len(lengths), max(lengths))
    _check_sample_kinds(job, kinds)
    if none_fit:
        need = max(hi for _, hi in none_fit.values())
        found = ", ".join(f"{n}: {lo}-{hi} tokens" for n, (lo, hi) in none_fit.items())
        raise ValueError(f"stage.seq_len={stage.seq_len} is shorter than every sample probed from data source(s) "
                         f"{sorted(none_fit)} (first {PROBE_SAMPLES} each; {found}; data.overlong={data.overlong}): "
                         f"no sample of them can ever fit a packed row. Raise stage.seq_len to at least {need}, or "
                         f"leave those sources out with stage.mixture")
    for name, (n, of, hi) in some_dropped.items():
        log.warning("stage.seq_len=%d: %d of the first %d samples of data source %s do not fit (longest %d tokens) "
                    "and will be dropped (counted as dropped/%s/...)", stage.seq_len, n, of, name, hi, name)


# the records that give an encoded sample kind (data/encode.py), and the data=shapes task that holds them
KIND_RECORDS = {"chosen": ("preference records (a 'chosen' and a 'rejected' reply)", "preference"),
                "rejected": ("preference records (a 'chosen' and a 'rejected' reply)", "preference"),
                "prompt": ("RL prompts (records with an 'answer' or a 'reward')", "rl")}


def _check_sample_kinds(job, kinds: dict) -> None:
    """The objective against the data: one that trains on some sample kinds only (stages.needed_kinds: dpo
    chosen/rejected, sapo prompt) needs a source whose probed samples have them, else it would fail at step 1.
    `kinds`: {source: the kinds of its probed samples}. A source with none of them alone is a warning."""
    from stages import needed_kinds

    need = needed_kinds(job.stage.objective)
    if not need:
        return
    useless = {n: ks for n, ks in kinds.items() if not ks & set(need)}
    if not useless:
        return
    name, want = job.stage.objective.get("name"), "/".join(need)
    gave = "; ".join(f"{n}: {', '.join(sorted(k or 'plain' for k in ks)) or 'no usable sample'}"
                     for n, ks in useless.items())
    records, task = KIND_RECORDS.get(need[0], (f"records that encode to kind {want}", None))
    if len(useless) < len(kinds):
        log.warning("stage.objective.name=%s trains on samples of kind %s only; the first %d samples of data "
                    "source(s) %s have none (%s): they give it nothing to train on; leave them out with "
                    "stage.mixture", name, want, PROBE_SAMPLES, sorted(useless), gave)
        return
    if job.data.name == "shapes" and task:
        fix = f"stage.mixture={{{task}: 1}} (data=shapes: the task `{task}` has them)"
    else:
        fix = "stage.mixture={SOURCE: 1} naming a source of them, or data.sources entries pointing at such records"
    raise ValueError(f"stage.objective.name={name} trains on samples of kind {want}, but none of the first "
                     f"{PROBE_SAMPLES} samples of data source(s) {sorted(useless)} is one (kinds they gave: {gave}). "
                     f"It needs {records}: set {fix}")


def _dropped(packer) -> int:
    return sum(n for reasons in packer.stats["dropped"].values() for n in reasons.values())


def run_config(cfg: DictConfig) -> dict | None:
    from training.loop import run

    job = to_job(cfg)
    rank, world = init_distributed()
    from training.rundir import watch_launcher

    watch_launcher()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    check_job(job, world)
    with own_output_dir(Path(job.output_dir), rank):
        if job.trainer.max_steps > 0 and not (Path(job.output_dir) / "DONE").is_file():
            check_sample_lengths(job, rank)
        return run(job, OmegaConf.to_yaml(cfg, resolve=True), rank, world)


@contextmanager
def own_output_dir(out: Path, rank: int):
    """Rank 0 holds the output directory's lock for the run's life (training/rundir.py); every rank learns
    whether it got it, so a refused launch stops on all ranks with the same message."""
    import torch.distributed as dist

    from training.rundir import RunLock

    lock, refused = RunLock(out), [None]
    if rank == 0:
        try:
            lock.__enter__()
        except ValueError as e:
            refused[0] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise ValueError(refused[0])
    try:
        yield
    finally:
        lock.__exit__()


def resolve_printed_config(argv: list[str]) -> list[str]:
    """`--cfg job|hydra|all` (`-c`) prints the config with its interpolations resolved (`output_dir:
    runs/tiny_qwen3_vl_s1_multimodal`, not `runs/${model.name}_${stage.name}`): Hydra's `--resolve` is added
    unless given. `--cfg job --no-resolve` prints the composed config as written."""
    if "--no-resolve" in argv:
        return [a for a in argv if a != "--no-resolve"]
    asks = any(a in ("--cfg", "-c") or a.startswith(("--cfg=", "-c=")) for a in argv)
    return [*argv, "--resolve"] if asks and "--resolve" not in argv else argv


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from training import console

    console.setup()  # known third-party noise: train.log only (training/console.py)
    try:
        summary = run_config(cfg)
    except (ValueError, NotImplementedError) as e:
        log.error("%s", e)
        sys.exit(2)
    import torch.distributed as dist

    if dist.is_initialized():  # a process group torn down at interpreter exit can abort the process (gloo threads)
        dist.destroy_process_group()
    if summary and summary.get("interrupted"):
        sys.exit(143)  # checkpointed on a signal, not done: launchers requeue or re-run


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resolve_printed_config(sys.argv[1:])]
    main()
