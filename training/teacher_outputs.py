"""Store a teacher's top-k log-probs in the shards, for `stage.objective.teacher=precomputed` distillation.

    python -m training.teacher_outputs --teacher runs/sft/hf --out /data/sft-teacher --top-k 32 -- \\
        stage=distill data=shards 'data.sources=[{name: sft, urls: /data/sft-{0000..0099}.tar}]' model=qwen3_vl ...

The overrides after `--` are the distillation stage's own (its model, data and encoder settings): each record is
encoded exactly as that stage's loader will encode it (the student's tokenizer, chat template and pixel budgets),
the teacher runs on the encoded samples (several packed into one row, kept apart by cu_seqlens, as in training),
and each output shard is its input shard with one more member per chat/document sample, `<key>.teacher.safetensors`
(data/teacher.py: the top-k token ids and log-probs of every supervised target, the targets and the input ids the
loader checks the member against). Log-probs are over the real tokens (the tokenizer's vocabulary, not a padded
embedding) at temperature 1; training applies its temperature and top_k (<= k) to them.

Samples the loader would skip (bad media, unknown shapes) are left out of the output and counted. Under torchrun
(or with RANK/WORLD_SIZE set) each process writes the shards i with i % WORLD_SIZE == RANK. The student's model is
built only for its tokenizer, image processor and config (the tiny presets cost nothing; a real model.path is
loaded once on the host).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import rope, teacher as stored
from data.encode import IGNORE, build_encoder
from data.errors import BadSample
from data.pack import PackConfig, collate
from data.pipeline import source_configs
from data.shards import SourceConfig, expand_urls, write_tar

log = logging.getLogger("teacher_outputs")


def topk_logps(lm_head, hidden: torch.Tensor, vocab: int, k: int, chunk: int = 1024):
    """(ids [N, k], log-probs [N, k]) of the teacher's k most likely tokens among the first `vocab`, chunked so that
    only `chunk` rows of fp32 logits exist at a time."""
    ids, logps = [], []
    for h in hidden.split(chunk):
        lp = F.log_softmax(lm_head(h).float()[:, :vocab], -1)
        top = lp.topk(k, dim=-1)
        ids.append(top.indices)
        logps.append(top.values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(logps)


class Writer:
    """Encodes raw samples, runs the teacher on batches of them and returns the members to write."""

    def __init__(self, job, teacher_path: str, k: int, batch_tokens: int, device: torch.device):
        from stages.distill import check_teacher
        from training import models
        from training.loop import frozen_model_config
        from training.vlm import VLM

        student = models.build(job.model)
        teacher = models.build(frozen_model_config(job.model, teacher_path))
        check_teacher(student, teacher)
        self.encoder = build_encoder(job.data.encoder, student, max_video_frames=job.data.max_video_frames)
        self.spec = rope.RopeSpec.from_config(teacher.model.config)
        del student
        self.vlm = VLM(teacher.model.to(device).eval().requires_grad_(False))
        self.vocab = min(teacher.model.config.get_text_config().vocab_size, len(teacher.tokenizer))
        self.k, self.batch_tokens, self.device, self.name = k, batch_tokens, device, str(teacher_path)
        self.pad = teacher.tokenizer.pad_token_id

    def encode(self, raw: dict):
        """The sample the stage's loader would make of `raw` (chat/document records only), or a BadSample."""
        samples = self.encoder.encode(raw)
        if [s["kind"] for s in samples] != [None]:
            raise BadSample("not_sft_format", raw["key"], "teacher outputs are for chat and document records")
        return rope.attach(self.spec, samples[0])

    @torch.no_grad()
    def members(self, samples: list[dict]) -> list[bytes]:
        """One teacher.safetensors member per sample, from one packed forward of all of them."""
        n = sum(len(s["input_ids"]) for s in samples)
        batch = collate([samples], PackConfig(seq_len=n, pad_id=self.pad, attention="varlen"))
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hidden, _ = self.vlm(batch, hidden=True)
        ids, logps = topk_logps(self.vlm.lm_head, hidden, self.vocab, self.k)
        out, at = [], 0
        for s in samples:
            targets = stored.targets_of(s["labels"], IGNORE)
            m = len(targets)
            out.append(stored.dump(ids[at:at + m].cpu(), logps[at:at + m].cpu(), targets, s["input_ids"], self.name))
            at += m
        assert at == len(ids), (at, len(ids))
        return out


def shard_samples(url: str, name: str, counts: dict):
    """The raw samples of one shard in order (the loader's reader: pickles and oversized members refused)."""
    src = SourceConfig(name=name, urls=url, shuffle_buffer=0, shuffle_shards=False).build()
    try:
        while True:
            try:
                raw = next(src)
            except BadSample as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                log.warning("skipped %s", e)
                if src.read_epoch > 0 or src.epoch > 1:
                    return
                continue
            if src.read_epoch > 0:
                return
            yield raw
    finally:
        src.close()


def run(job, teacher_path: str, out: Path, k: int, batch_tokens: int, rank: int = 0, world: int = 1) -> dict:
    """Writes the output shards of this rank; returns the counts {written, skipped reasons...}."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    w = Writer(job, teacher_path, k, batch_tokens, device)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict = {"written": 0}
    shards = [(src.name, url) for src in source_configs(job.data, job.stage.mixture) for url in expand_urls(src.urls)]
    names = [Path(url).name for _, url in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"the sources' shards share file names ({sorted(n for n in names if names.count(n) > 1)[:3]}); "
                         f"write each source with its own --out")
    for i, (name, url) in enumerate(shards):
        if i % world != rank:
            continue
        t0, items, pending = time.time(), [], []  # pending: (key, members, sample) not yet through the teacher

        def flush():
            for (key, members, _), data in zip(pending, w.members([p[2] for p in pending])):
                items.append((key, {**members, stored.MEMBER: data}))
            pending.clear()

        for raw in shard_samples(url, name, counts):
            try:
                sample = w.encode({**raw, "source": name})
            except BadSample as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                log.warning("skipped %s", e)
                continue
            media = {m: v for m, v in raw["media"].items() if m != stored.MEMBER}  # an older member is replaced
            pending.append((raw["key"], {"json": json.dumps(raw["record"], ensure_ascii=False).encode(), **media},
                            sample))
            if sum(len(p[2]["input_ids"]) for p in pending) >= batch_tokens:
                flush()
        flush()
        write_tar(str(out / Path(url).name), items)
        counts["written"] += len(items)
        log.info("%s: %d samples with teacher outputs (%.1f s)", out / Path(url).name, len(items), time.time() - t0)
    return counts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m training.teacher_outputs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="the teacher's local HF directory (e.g. a stage's hf/)")
    ap.add_argument("--out", required=True, help="output directory: one shard per input shard, same file names")
    ap.add_argument("--top-k", type=int, default=32, help="tokens stored per target (training's top_k <= this)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens of samples per teacher forward")
    a = ap.parse_args(argv)
    if a.top_k < 1 or a.batch_tokens < 1:
        ap.error("--top-k and --batch-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from launch.pipeline import compose
    from training.train import to_job

    job = to_job(compose("config", overrides))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    counts = run(job, a.teacher, Path(a.out), a.top_k, a.batch_tokens, rank, world)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
