"""Hydra entry point for one stage: `python -m training.train stage=... model=... [overrides]`.

Hydra stays here: the composed config is turned into plain dataclasses once (unknown keys fail), and the
process layout (rank, world size) is read from the launcher's environment once and passed down.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
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
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def check_job(job, world: int) -> None:
    """Settings that can never work fail here, before a model is built or a step runs, with a ValueError that
    names the key and the fix. Pure checks of the typed config; the data probe is `check_sample_lengths`."""
    from training import models
    from training.engine import deepspeed_config

    tr, stage = job.trainer, job.stage
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(tr, key) < 1:
            raise ValueError(f"trainer.{key}={getattr(tr, key)} must be at least 1")
    if tr.max_steps < 0:
        raise ValueError(f"trainer.max_steps={tr.max_steps} must be >= 0 (0 exports the starting model)")
    if not stage.trainable:
        raise ValueError(f"stage.trainable is empty: stage {stage.name!r} would train nothing; name at least one "
                         f"of {list(models.GROUPS)} (e.g. stage.trainable=[merger,llm])")
    for key, names in (("stage.trainable", stage.trainable), ("stage.lr_mult", list(stage.lr_mult))):
        unknown = sorted(set(names) - set(models.GROUPS))
        if unknown:
            raise ValueError(f"{key} names unknown group(s) {unknown}; groups are {list(models.GROUPS)}")
    if stage.seq_len < 1:
        raise ValueError(f"stage.seq_len={stage.seq_len} must be >= 1 (tokens per packed row)")
    # zero stage, dtype, offload combinations, engine.raw batch keys vs trainer.* and the world size
    deepspeed_config(job.engine, tr.micro_batch_size, tr.grad_accum, world, stage.optimizer.grad_clip)


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
    that is only partly too long loses those samples, counted as dropped/<source>/too_long; a warning)."""
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
    encoder = build_encoder(data.encoder, bundle)
    none_fit, some_dropped = {}, {}
    for src in sources:
        it = SourceConfig(**{**src.__dict__, "shuffle_buffer": 0}).build(0, 1, 0, 1)  # the first samples, in order
        packer = PackConfig(seq_len=stage.seq_len, buffer_size=1, overlong=data.overlong).build()
        lengths, fit = [], 0
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


def _dropped(packer) -> int:
    return sum(n for reasons in packer.stats["dropped"].values() for n in reasons.values())


def run_config(cfg: DictConfig) -> dict | None:
    from training.loop import run

    job = to_job(cfg)
    rank, world = init_distributed()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    check_job(job, world)
    if job.trainer.max_steps > 0 and not (Path(job.output_dir) / "DONE").is_file():
        check_sample_lengths(job, rank)
    return run(job, OmegaConf.to_yaml(cfg, resolve=True), rank, world)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
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
    main()
