"""Sequence-parallel benchmark (a script, not a test): `python -m training.sp_bench` (CPU, gloo; 2 cores here).

Why: Ulysses SP (training/sp.py) exists to cut what one rank holds for a long row; this measures how much, and
what the ViT split saves over every rank encoding every image.

What, per row length L in `--lengths` (default 8K, 16K, 32K tokens):
  SP=1  one process: ONE training step (forward + backward, no optimizer) of the memory benchmark's model
        (training/memory.py: the tiny Qwen3-VL layers with the real 151,936-token vocabulary, fp32, sdpa_varlen,
        gradient checkpointing per decoder layer) on one packed text row of L tokens (samples of `--sample-len`),
        the lm objective's loss path (VLM.forward with weights: the chunked, fused CE);
  SP=2  the same step under torchrun with 2 processes, one SP group (DeepSpeed's Ulysses attention, each rank
        holding L/2 tokens through the decoder).
Each cell is fresh processes (glibc's mmap threshold at 64 KiB, so a freed tensor leaves RSS at once); a process
records its RSS after building the model and batch, runs a warm-up and `--steps` timed steps, and reports RSS
high-water marks minus that baseline, per phase of the step (VmHWM reset between phases): the decoder's forward,
the loss (lm_head per chunk, its gradients computed there), the backward (decoder recompute and gradients).
"step GiB" is the largest of the three; the peaks do not add up: the loss phase (one chunk of [chunk, V] fp32
logits, lm_head's fp32 gradient) is as large at 1K as at 32K and, with tiny layers, larger than all the
decoder's activations. So "activation GiB" = the decoder phases' peak at L minus the same figure at a 1K-token
row (what does not grow with L: gradients of the embedding and lm_head), the part sequence parallelism divides.
tokens/s = L / the fastest timed step (the group's throughput; at SP=2 both processes share the 2 cores).
The losses of SP=1 and SP=2 must agree (printed, asserted < 1e-5 relative).

ViT: an image-heavy micro-batch (`--images` images of 16x16 patches each), the time per rank of the visual
encoding forward + backward (VLM.encode_visual) at SP=2 with parallel.sp_vision=split (each rank encodes half the
images, features all-gathered) vs replicate (each rank encodes all), best of `--steps`.

Reading it: "ratio" = SP=2 / SP=1 per-rank memory (target <= 0.55 for activations); "ViT ratio" = split / replicate
per-rank time (target <= 0.6). `--json PATH` writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from training.memory import _status

BASELINE = "SP=1: the same step in one process"


def _init():
    from training.train import init_distributed

    return init_distributed()


def _sp(vlm, sp: int, vision: str = "split"):
    if sp > 1:
        from training.engines.deepspeed import sequence_parallel

        sequence_parallel(vlm, sp, vision)


def _report(out: dict) -> None:
    """Rank 0 prints every rank's figures (one JSON line)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    if dist.get_rank() == 0:
        print(json.dumps(parts), flush=True)


def child_step(L: int, sp: int, args) -> None:
    import torch

    from training.memory import build_model, make_batch
    from training.vlm import VLM

    _init()
    torch.set_num_threads(args.threads)
    vlm = VLM(build_model(), loss_chunk=0)
    _sp(vlm, sp)
    batch = make_batch(L, args.sample_len, 1.0)
    w = batch["weights"]

    # phases of the step: the decoder's forward (hidden_states), the loss (its gradients are computed in the
    # forward, one chunk of logits at a time), the backward (decoder recompute + gradients); each phase's peak
    probe = {}
    hidden_states = vlm.hidden_states

    def probed(b):
        out = hidden_states(b)
        probe["forward"] = _mark(base)
        return out

    vlm.hidden_states = probed

    def step() -> float:
        _mark(base)
        loss, ce = vlm(batch, weights=w)
        probe["loss"] = _mark(base)
        loss = loss / w.sum()
        del ce
        loss.backward()
        probe["backward"] = _mark(base)
        vlm.zero_grad(set_to_none=True)
        return float(loss.detach())

    base = _status("VmRSS")
    step()
    times, peaks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        peaks.append(dict(probe))
    worst = {k: max(p[k] for p in peaks) for k in peaks[0]}
    _report(dict(length=L, sp=sp, loss=loss, seconds=min(times), step_gib=max(worst.values()),
                 decoder_gib=max(worst["forward"], worst["backward"]), loss_gib=worst["loss"]))


def _mark(base: float) -> float:
    """The RSS high-water mark since the last mark, minus `base` (GiB); resets the mark (VmHWM := VmRSS)."""
    peak = _status("VmHWM") - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def child_vit(vision: str, args) -> None:
    import torch

    from training.memory import build_model
    from training.vlm import VLM

    _init()
    torch.set_num_threads(args.threads)
    vlm = VLM(build_model(), loss_chunk=0)
    _sp(vlm, 2, vision)
    cfg = vlm.model.visual.config
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    batch = dict(pixel_values=torch.randn(args.images * 256, dim, generator=g),
                 image_grid_thw=torch.tensor([[1, 16, 16]] * args.images))
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        features, zero = vlm.encode_visual(batch)
        feats, ds = features["image"]
        (feats.sum() + sum(x.sum() for x in ds or []) + zero).backward()
        vlm.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    _report(dict(vision=vision, seconds=min(times[1:])))


def _launch(nproc: int, extra: list[str], args) -> list[dict]:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc > 1 else [sys.executable]) + [
        "-m", "training.sp_bench", *extra, "--steps", str(args.steps), "--sample-len", str(args.sample_len),
        "--images", str(args.images), "--threads", str(max(1, args.threads // nproc))]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("[")][-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768])
    p.add_argument("--sample-len", type=int, default=4096, help="tokens per packed sample")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up; the fastest is reported")
    p.add_argument("--images", type=int, default=16, help="images of the ViT comparison's micro-batch")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--child-step", nargs=2, type=int, metavar=("L", "SP"), help=argparse.SUPPRESS)
    p.add_argument("--child-vit", metavar="VISION", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_step:
        return child_step(*args.child_step, args)
    if args.child_vit:
        return child_vit(args.child_vit, args)

    figures = {"baseline": BASELINE, "cells": [], "vit": {}}
    fixed = {sp: _launch(sp, ["--child-step", "1024", str(sp)], args) for sp in (1, 2)}
    print(f"per-rank step memory and tokens/s, tiny Qwen3-VL layers, V=151936, fp32, {args.steps} timed steps; "
          f"baseline: {BASELINE}")
    print(f"{'tokens':>7} | {'SP=1 GiB':>8} {'act':>6} {'tok/s':>7} | {'SP=2 GiB/rank':>13} {'act':>6} {'tok/s':>7} | "
          f"{'act ratio':>9} {'step ratio':>10} {'speed':>6} | loss rel diff")
    for L in args.lengths:
        one, two = _launch(1, ["--child-step", str(L), "1"], args), _launch(2, ["--child-step", str(L), "2"], args)
        m1, m2 = one[0]["step_gib"], max(r["step_gib"] for r in two)
        d1, d2 = one[0]["decoder_gib"], max(r["decoder_gib"] for r in two)
        a1, a2 = d1 - fixed[1][0]["decoder_gib"], d2 - max(r["decoder_gib"] for r in fixed[2])
        t1, t2 = L / one[0]["seconds"], L / max(r["seconds"] for r in two)
        diff = abs(one[0]["loss"] - two[0]["loss"]) / abs(one[0]["loss"])
        assert diff < 1e-5, (L, one, two)
        figures["cells"].append(dict(length=L, sp1=one, sp2=two, act_ratio=a2 / a1, step_ratio=m2 / m1,
                                     speed=t2 / t1, loss_rel_diff=diff))
        print(f"{L:>7} | {m1:8.2f} {a1:6.2f} {t1:7.0f} | {m2:13.2f} {a2:6.2f} {t2:7.0f} | {a2 / a1:9.2f} "
              f"{m2 / m1:10.2f} {t2 / t1:6.2f} | {diff:.1e}", flush=True)
    split = max(r["seconds"] for r in _launch(2, ["--child-vit", "split"], args))
    replicate = max(r["seconds"] for r in _launch(2, ["--child-vit", "replicate"], args))
    figures["vit"] = dict(images=args.images, split_s=split, replicate_s=replicate, ratio=split / replicate)
    print(f"ViT forward+backward per rank, {args.images} images of 256 patches, SP=2: split {split * 1e3:.0f} ms, "
          f"replicate {replicate * 1e3:.0f} ms, ratio {split / replicate:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
