"""Trainer benchmark (a script, not a test): `python -m training.bench` (CPU, one process per run, ~10 min on 2 cores).

(a) Throughput: real (non-pad) tokens/s of our trainer against `transformers.Trainer` (the named baseline), both
    run in this session, each in a fresh process of its own (so neither sees the other's process group or
    thread settings: transformers.Trainer would wrap the model in DDP if our process group existed, and
    accelerate then resets torch's thread count), on the same tiny model (conf/model/tiny_qwen3_vl.yaml, built
    by training.models.build: same seeded initial weights), the same samples in the same order, the same number
    of optimizer steps, the same micro-batch sample count and the same optimizer (torch AdamW over
    training.engine.optimizer_groups: same lr, betas, eps and weight-decay groups; grad clip 1.0; constant lr),
    fp32, `--threads` intra-op threads and `--workers` data loader processes in both. Ours packs samples into
    `--seq-len` rows (data/pack.py) and runs them through DeepSpeed with engine=zero2 (the default; on one rank
    it runs as stage 0, training/engine.py `for_world`). The baseline's micro-batch i holds exactly the samples
    of our micro-batch i (a batch sampler replays our grouping), each encoded on the fly by the same encoder in
    its Dataset and padded to the longest sample of its micro-batch (the usual HF collator). Both count the same
    tokens (the sum of sample lengths; our row padding and the baseline's padding are not counted), and the run
    checks that both saw the same tokens per step. Two sample mixes (MIXES): `wide`, samples of 12 to 227 tokens
    as in real VLM data (the target's), and `narrow`, the tiny demo's near-uniform short samples.
    Start-up is excluded from both the same way: the clock runs from the end of optimizer step `--warmup` to
    the end of the last step, with timestamps taken where each trainer reports a finished step (our
    Metrics.log, the baseline's on_step_end callback), so imports, model build, DeepSpeed/Trainer set-up, the
    first steps' lazy initialisation and our final checkpoint/export all lie outside. The trainers run
    `--rounds` times, alternating; the best round of each is reported. A last line times the bare model's
    forward+backward on the packed vs the padded micro-batches: what packing alone gives on this model and data.

(b) Resume cost: one run to step `--resume-steps` (default 1000) at a tiny seq_len, checkpointing at step 10
    (through the preemption path: SIGUSR1, as SLURM sends it) and at the last step. Then, from a fresh
    output dir holding only that checkpoint, the time from calling the trainer until the first new optimizer
    step has completed (model build, engine set-up, checkpoint load, data-state restore, one step), for the
    checkpoint at step 10 and the one at the last step; best of `--repeats`, interleaved (one resume takes
    ~0.3 s, so single timings swing with the machine's load; per-phase minima and the CPU-time ratio are
    printed too). The data pipeline's load_state_dict restores shard offsets, the mixture RNG and the packer's
    few buffered samples (re-encoded, at most data.pack_buffer of them), so it must not grow with the step.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


class _Stop(Exception):
    """Raised from the step hook to end a timed resume right after its first step."""


@contextmanager
def step_clock(stop_after: int | None = None, on_step=None):
    """Timestamps of every finished optimizer step of our trainer, taken where the loop hands
    the step's metrics row to Metrics.log; optionally ends the run after `stop_after` steps."""
    from training import metrics

    stamps: list[tuple[int, float, float]] = []  # (step, wall clock, process CPU time)
    real = metrics.Metrics.log

    def log(self, row, start_step):
        real(self, row, start_step)
        stamps.append((row["step"], time.perf_counter(), time.process_time()))
        if on_step is not None:
            on_step(row["step"])
        if stop_after is not None and len(stamps) >= stop_after:
            raise _Stop

    metrics.Metrics.log = log
    try:
        yield stamps
    finally:
        metrics.Metrics.log = real


def _overrides(out: Path, seq_len: int, rows: int, steps: int, save_every: int = 0, workers: int = 0) -> list[str]:
    return ["logger=none", "model=tiny_qwen3_vl", "data=shapes", f"data.num_workers={workers}", "engine=zero2",
            "stage=s1_multimodal", f"stage.seq_len={seq_len}", f"trainer.micro_batch_size={rows}",
            "trainer.grad_accum=1", f"trainer.max_steps={steps}", f"trainer.save_every={save_every}",
            "trainer.keep_checkpoints=2", "stage.schedule.kind=constant", "stage.schedule.warmup_ratio=0.0",
            "stage.lr_mult.vision=1.0", f"output_dir={out}"]


# ---------------------------------------------------------------------------------------------------- (a)
def run_ours(out: Path, args) -> dict:
    from training.train import run_config

    shutil.rmtree(out, ignore_errors=True)
    with step_clock() as stamps:
        run_config(compose([*_overrides(out, args.seq_len, args.rows, args.steps, workers=args.workers),
                            *args.override]))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in rows[args.warmup:])
    secs = stamps[-1][1] - stamps[args.warmup - 1][1]
    cpu = stamps[-1][2] - stamps[args.warmup - 1][2]
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "tokens_per_cpu_s": tokens / cpu,
            "step_tokens": [r["tokens"] for r in rows],
            "data_wait_frac": sum(r["data_wait_frac"] * r["step_time_s"] for r in rows[args.warmup:]) / secs}


def capture_schedule(args):
    """Our trainer's micro-batches, made by the same data pipeline (deterministic): per optimizer step the list
    of raw samples of each micro-batch, in sample-id order (= order in the packed rows)."""
    from data import pipeline as dp
    from training import models
    from training.train import to_job

    job = to_job(compose([*_overrides(Path("unused"), args.seq_len, args.rows, args.steps), *args.override]))
    job.data.num_workers = 0  # the same micro-batches, encoded in this process where `seen` records them
    bundle = models.build(job.model)
    seen: dict = {}
    real = dp.Chain.encode

    def encode(self, raw):
        seen[(raw["source"], str(raw["key"]))] = raw
        return real(self, raw)

    dp.Chain.encode = encode
    try:
        layout = dp.Layout(rank=0, world=1, micro_batch=args.rows, grad_accum=1, seq_len=args.seq_len)
        pipe = dp.Pipeline(job.data, job.stage.mixture, bundle, layout)
        steps = []
        for _ in range(args.steps):
            (mb,) = pipe.next_step()
            steps.append(([seen[(m["source"], str(m["key"]))] for m in mb["meta"]],
                          int((mb["sample_ids"] >= 0).sum())))
    finally:
        dp.Chain.encode = real
    return job, steps


def pad_to_longest(samples: list[dict], pad_id: int) -> dict:
    """The usual HF collator: samples side by side, padded to the longest, 2-D attention mask, media concatenated."""
    from data.encode import IGNORE

    L = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = s["input_ids"], s["labels"], 1
        if "mm_token_type_ids" in s:
            mm[b, :n] = s["mm_token_type_ids"]
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, mm_token_type_ids=mm)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def model_only(job, steps, args, repeats: int = 3) -> dict:
    """The packing gain with no trainer around it: CPU seconds of the bare model's forward+backward (our loss on
    our packed micro-batches vs HF's loss on the padded ones, same samples), alternating, best of `repeats`.
    This is the most packing can give on this model and data; the trainer comparison adds everything else."""
    from data import pipeline as dp
    from data.encode import build_encoder
    from stages import lm
    from training import models

    from training.vlm import VLM

    bundle = models.build(job.model)
    model = bundle.model
    step = VLM(model, job.model.loss_chunk)
    layout = dp.Layout(rank=0, world=1, micro_batch=args.rows, grad_accum=1, seq_len=args.seq_len)
    pipe = dp.Pipeline(job.data, job.stage.mixture, bundle, layout)
    n = min(len(steps), 12)
    packed = [pipe.next_step()[0] for _ in range(n)]
    encoder = build_encoder(job.data.encoder, bundle)
    padded = [pad_to_longest([encoder.encode(r)[0] for r in samples], bundle.tokenizer.pad_token_id)
              for samples, _ in steps[:n]]
    obj = lm.LMObjective(lm.Config(**{k: v for k, v in job.stage.objective.items() if k != "name"}))

    def ours(mb):
        mb = dict(mb, weights=obj.weights(mb))
        ls, _ = obj.loss_sum(step, mb)
        (ls / mb["weights"].sum()).backward()

    def hf(batch):
        model(**batch, use_cache=False).loss.backward()

    best = {"packed": float("inf"), "padded": float("inf")}
    for _ in range(repeats):
        for name, f, data in (("packed", ours, packed), ("padded", hf, padded)):
            t0 = time.process_time()
            for d in data:
                f(d)
            model.zero_grad(set_to_none=True)
            best[name] = min(best[name], time.process_time() - t0)
    return {k: v / n for k, v in best.items()}


def run_baseline(job, steps, out: Path, args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from data.encode import build_encoder
    from training import models
    from training.engine import optimizer_groups

    bundle = models.build(job.model)  # the same seeded initial weights as ours
    groups = models.param_groups(bundle.model, bundle.family)
    models.apply_trainable(bundle.model, groups, job.stage.trainable)
    encoder = build_encoder(job.data.encoder, bundle)
    raws = [raw for samples, _ in steps for raw in samples]
    batches, i = [], 0
    for samples, _ in steps:
        batches.append(list(range(i, i + len(samples))))
        i += len(samples)
    pad_id = bundle.tokenizer.pad_token_id
    stamps: list[tuple[float, float]] = []
    tokens: list[int] = []
    slots: list[int] = []

    class Samples(torch.utils.data.Dataset):  # encoded on the fly, as an HF dataset with a processor would
        def __len__(self):
            return len(raws)

        def __getitem__(self, k):
            (s,) = encoder.encode(raws[k])
            return s

    def collate(samples):
        return pad_to_longest(samples, pad_id)

    class Replay(Trainer):  # micro-batch i = exactly the samples of our micro-batch i
        def training_step(self, model, inputs, *a, **kw):  # counted here: collate may run in a worker process
            tokens.append(int(inputs["attention_mask"].sum()))  # real tokens only
            slots.append(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, *a, **kw)

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=collate,
                                               num_workers=args.workers)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    opt_cfg = job.stage.optimizer
    opt = torch.optim.AdamW(optimizer_groups(bundle.model, groups, job.stage), lr=opt_cfg.lr,
                            betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    targs = TrainingArguments(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=1,
                              gradient_accumulation_steps=1, max_grad_norm=opt_cfg.grad_clip, use_cpu=True,
                              logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                              remove_unused_columns=False, dataloader_num_workers=args.workers,
                              seed=job.trainer.seed, bf16=False, fp16=False)
    trainer = Replay(model=bundle.model, args=targs, train_dataset=Samples(), optimizers=(opt, sched),
                     callbacks=[Clock()])
    trainer.train()
    if len(stamps) != args.steps or len(tokens) != args.steps:
        raise RuntimeError(f"baseline ran {len(stamps)} steps over {len(tokens)} batches, expected {args.steps}")
    n = sum(tokens[args.warmup:])
    secs = stamps[-1][0] - stamps[args.warmup - 1][0]
    cpu = stamps[-1][1] - stamps[args.warmup - 1][1]
    return {"tokens": n, "seconds": secs, "tokens_per_s": n / secs, "tokens_per_cpu_s": n / cpu, "step_tokens": tokens,
            "fill": sum(tokens) / sum(slots), "batch_samples": [len(b) for b in batches]}


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child(kind: str, r: int, work: Path, args) -> dict:
    """One trainer run in a fresh process: neither sees the other's process group (transformers.Trainer would
    wrap the model in DDP if ours had initialised one) or thread settings (accelerate resets torch's thread
    count when it finds a process group); OMP_NUM_THREADS is pinned so neither library changes it."""
    result = work / f"{kind}_{r}.json"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "training.bench", "--child", kind, "--result", str(result), "--work-dir", str(work),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
           "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--round", str(r),
           "--workers", str(args.workers),
           *(f"--override={o}" for o in args.override)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def child_main(args) -> None:
    work = Path(args.work_dir)
    if args.child == "ours":
        out = run_ours(work / f"ours_{args.round}", args)
    elif args.child == "model":
        job, steps = capture_schedule(args)
        out = model_only(job, steps, args)
    else:
        job, steps = capture_schedule(args)
        out = run_baseline(job, steps, work / f"hf_{args.round}", args)
        out["schedule_tokens"] = [t for _, t in steps]
    out["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(out))


# The sample mixes of (a). `wide` (the target's): every language-modelling task of data=shapes with images of 64 to
# 448 px at up to 448x448 pixels (4 to 196 visual tokens), 16-frame videos and text-only documents: samples of 12
# to 227 tokens, the spread of real VLM data, where pad-to-longest wastes most. `narrow`: the tiny demo's data
# (captions and VQA on <=128 px images, 16 visual tokens): nearly uniform 20- to 40-token samples, where padding
# wastes little and packing has little to gain.
MIXES = {
    "wide": {"seq_len": 512, "override": ["data.shapes.tasks=[caption,grounding,vqa,video,text]",
                                          "data.shapes.max_size=448", "model.max_pixels=200704"]},
    "narrow": {"seq_len": 256, "override": []},
}


def throughput(work: Path, args) -> dict:
    names = list(MIXES) if args.mix == "both" else [args.mix]
    out = {}
    for name in names:
        a = argparse.Namespace(**vars(args))
        a.override = [*MIXES[name]["override"], *args.override]
        a.seq_len = args.seq_len or MIXES[name]["seq_len"]
        out[name] = throughput_mix(work / name, a, name)
    return out


def throughput_mix(work: Path, args, name: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    print(f"[a] mix {name!r}: {args.steps} optimizer steps, 1 micro-batch each: {args.rows} packed rows of "
          f"{args.seq_len} tokens (ours); the first {args.warmup} steps are outside the clock; torch threads "
          f"{args.threads}, {args.workers} data loader worker(s) each; each run in its own process", flush=True)
    ours, base = [], []
    for r in range(args.rounds):  # alternating, so drifting machine load hits both alike
        o = _child("ours", r, work, args)
        b = _child("baseline", r, work, args)
        if o["step_tokens"] != b["schedule_tokens"] or b["step_tokens"] != b["schedule_tokens"]:
            raise RuntimeError("the two trainers did not see the same micro-batches; the comparison is void")
        if r == 0:
            n, tok = sum(b["batch_samples"]), sum(o["step_tokens"])
            print(f"    same {n} samples in both ({n / args.steps:.1f} per micro-batch), {tok:.0f} real tokens; ours' "
                  f"rows {100 * tok / (args.steps * args.rows * args.seq_len):.0f}% real tokens, the baseline's padded "
                  f"batches {100 * b['fill']:.0f}%", flush=True)
        ours.append(o)
        base.append(b)
        print(f"    round {r + 1}: ours {o['tokens_per_s']:6.0f} tokens/s (data wait "
              f"{100 * o['data_wait_frac']:.0f}%); transformers.Trainer {b['tokens_per_s']:6.0f} tokens/s", flush=True)
    o = max(ours, key=lambda x: x["tokens_per_s"])
    b = max(base, key=lambda x: x["tokens_per_s"])
    ratio = o["tokens_per_s"] / b["tokens_per_s"]
    print(f"[a] {name}: ours (packed rows, DeepSpeed):          {o['tokens_per_s']:8.0f} real tokens/s (best of "
          f"{args.rounds})", flush=True)
    print(f"[a] {name}: transformers.Trainer (pad-to-longest): {b['tokens_per_s']:8.0f} real tokens/s (best of "
          f"{args.rounds})", flush=True)
    print(f"[a] {name}: ratio ours / transformers.Trainer: {ratio:.2f}x"
          + (f" (target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})" if name == "wide" else ""), flush=True)
    m = _child("model", 0, work, args)
    print(f"[a] {name}: the bare model, forward+backward per micro-batch (no trainer, no optimizer, no data): packed "
          f"{1e3 * m['packed']:.0f} ms vs padded {1e3 * m['padded']:.0f} ms CPU, {m['padded'] / m['packed']:.2f}x: "
          f"what packing alone gives here", flush=True)
    figures = {"ours_tokens_per_s": o["tokens_per_s"], "baseline_tokens_per_s": b["tokens_per_s"], "ratio": ratio,
               "baseline_fill": b["fill"], "model_only_ratio": m["padded"] / m["packed"]}
    if args.workers == 0:  # with loader workers, the main process's CPU time leaves the data work out
        oc = max(x["tokens_per_cpu_s"] for x in ours)
        bc = max(x["tokens_per_cpu_s"] for x in base)
        print(f"[a] {name}: per CPU-second (less sensitive to other jobs on the machine): ours {oc:.0f}, "
              f"transformers.Trainer {bc:.0f} real tokens, ratio {oc / bc:.2f}x", flush=True)
        figures["cpu_ratio"] = oc / bc
    return figures


# ---------------------------------------------------------------------------------------------------- (b)
def train_long(out: Path, args) -> None:
    """To step `resume_steps`, checkpointing at step 10 (SIGUSR1, the preemption path) and at the last step."""
    from training.train import run_config

    shutil.rmtree(out, ignore_errors=True)
    cfg = _overrides(out, args.resume_seq_len, 1, args.resume_steps)

    def preempt(step):  # the flag is read at the end of the next step, which then checkpoints
        if step == 9:
            os.kill(os.getpid(), signal.SIGUSR1)

    t = time.perf_counter()
    with step_clock(on_step=preempt):
        summary = run_config(compose(cfg))
    if not (summary or {}).get("interrupted") or summary["step"] != 10:
        raise RuntimeError(f"the preempted run should have stopped with a checkpoint at step 10: {summary}")
    with step_clock():
        run_config(compose(cfg))  # resumes at 10, saves only at the last step (save_every=0), keeps both
    print(f"[b] trained to step {args.resume_steps} in {time.perf_counter() - t:.0f} s (seq_len "
          f"{args.resume_seq_len}, 1 row per step)", flush=True)


def time_resume(src: Path, step: int, work: Path, args) -> dict:
    """Seconds from calling the trainer to the end of the first new step; of which Pipeline.load_state_dict and
    the step itself (its step_time_s)."""
    from data import pipeline as dp
    from training.train import run_config

    tag = f"step_{step:08d}"
    out = work / f"resume_{step}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag + "\n")
    # the same config for both: one more step than the longer run has
    cfg = compose(_overrides(out, args.resume_seq_len, 1, args.resume_steps + 1))
    from training.checkpoint import Checkpointer

    real_data, real_ckpt = dp.Pipeline.load_state_dict, Checkpointer.load
    restore, ckpt = [], []

    def load_state_dict(self, state):
        t0 = time.perf_counter()
        real_data(self, state)
        restore.append(time.perf_counter() - t0)

    def load(self, engine, tag):
        t0 = time.perf_counter()
        out = real_ckpt(self, engine, tag)
        ckpt.append(time.perf_counter() - t0)
        return out

    dp.Pipeline.load_state_dict, Checkpointer.load = load_state_dict, load
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        with step_clock(stop_after=1) as stamps:
            try:
                run_config(cfg)
            except _Stop:
                pass
    finally:
        dp.Pipeline.load_state_dict, Checkpointer.load = real_data, real_ckpt
    if stamps[0][0] != step + 1:
        raise RuntimeError(f"the resumed run's first step was {stamps[0][0]}, expected {step + 1}")
    (row,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"total": stamps[0][1] - t0, "cpu": stamps[0][2] - c0, "restore": restore[0], "checkpoint": ckpt[0],
            "step": row["step_time_s"]}


def resume_cost(work: Path, args) -> dict:
    src = work / "long"
    train_long(src, args)
    last = args.resume_steps
    best: dict = {10: {}, last: {}}
    for _ in range(args.repeats):
        for step in (10, last):  # interleaved, so drifting machine load hits both alike
            got = time_resume(src, step, work, args)
            if args.verbose:
                print(f"    resume from step {step}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in got.items()),
                      flush=True)
            for k, v in got.items():
                best[step][k] = min(v, best[step].get(k, v))
    for step in (10, last):
        b = best[step]
        print(f"[b] resume from step {step:<5d} {b['total']:.3f} s to the end of step {step + 1} (of which data-state "
              f"restore {1e3 * b['restore']:.1f} ms, checkpoint load {1e3 * b['checkpoint']:.0f} ms, the step itself "
              f"{1e3 * b['step']:.0f} ms)", flush=True)
    ratio = best[last]["total"] / best[10]["total"]
    setup = (best[last]["total"] - best[last]["step"]) / (best[10]["total"] - best[10]["step"])
    print(f"[b] ratio step {last} / step 10: {ratio:.3f} (best of {args.repeats}; target <= 1.1: "
          f"{'met' if ratio <= 1.1 else 'MISSED'}); without the step itself {setup:.3f}; data-state restore "
          f"{best[last]['restore'] / best[10]['restore']:.2f}; by process CPU time "
          f"{best[last]['cpu'] / best[10]['cpu']:.3f}", flush=True)
    return {"resume_10_s": best[10]["total"], f"resume_{last}_s": best[last]["total"], "ratio": ratio,
            "setup_ratio": setup, "cpu_ratio": best[last]["cpu"] / best[10]["cpu"],
            "restore_10_ms": 1e3 * best[10]["restore"], f"restore_{last}_ms": 1e3 * best[last]["restore"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="(a) optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=5, help="(a) first steps left out of the clock")
    p.add_argument("--rows", type=int, default=2, help="(a) packed rows per micro-batch (ours)")
    p.add_argument("--mix", choices=[*MIXES, "both"], default="both", help="(a) sample mix(es), see MIXES")
    p.add_argument("--seq-len", type=int, default=None, help="(a) tokens per packed row (ours; default: the mix's)")
    p.add_argument("--rounds", type=int, default=3, help="(a) runs of each trainer, alternating; best reported")
    p.add_argument("--resume-steps", type=int, default=1000, help="(b) step of the late checkpoint")
    p.add_argument("--resume-seq-len", type=int, default=64, help="(b) tokens per row (small: fast steps)")
    p.add_argument("--repeats", type=int, default=10, help="(b) timed resumes of each checkpoint; best reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both trainers (1: stable on a shared 2-core machine, where 2 "
                        "OpenMP threads measured several times slower and noisy under other jobs' load)")
    p.add_argument("--workers", type=int, default=1,
                   help="(a) data loader worker processes for both trainers (ours: data.num_workers, the baseline's "
                        "DataLoader num_workers), so that both encode while the model computes")
    p.add_argument("--override", action="append", default=[],
                   help="(a) extra Hydra override, e.g. --override engine=zero1 (ours) or "
                        "--override 'data.shapes.tasks=[caption,grounding,vqa,video,text]' (both: the samples)")
    p.add_argument("--verbose", action="store_true", help="(b) print every timed resume")
    p.add_argument("--only", choices=["throughput", "resume"], default=None)
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--child", choices=["ours", "baseline", "model"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("training", "data", "DeepSpeed", "deepspeed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.child:
        child_main(args)
        return {}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="qwen_vl_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    figures = {}
    try:
        if args.only in (None, "throughput"):
            figures["throughput"] = throughput(work, args)
        if args.only in (None, "resume"):
            figures["resume"] = resume_cost(work, args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"bench finished in {time.perf_counter() - t:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
