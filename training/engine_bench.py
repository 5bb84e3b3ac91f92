"""Engine benchmark (a script, not a test): `python -m training.engine_bench` — megatron layouts against ZeRO-3 on 2 ranks.

Both runs are the real trainer under torchrun (2 processes, gloo on CPU), one after the other in this session, on
the same tiny model (`--model`), stage, data and steps; the named baseline is `engine=zero3` (the DeepSpeed engine
that shards parameters, i.e. the one a model too big for one device uses today). The megatron runs: TP 2, TP 2 with
sequence parallelism, PP 2 (1F1B over `--accum` micro-batches), and DP 2 (the distributed optimizer alone), all
with megatron's distributed optimizer. Each run's tokens/s is the mean of
`tokens_per_s` over the steps after `--warmup` (metrics.jsonl: the loop's own clock, start-up excluded); peak
memory is each rank's `peak_mem_gb` (the process's RSS high-water mark on CPU, the allocator's peak on a GPU),
the largest over ranks and steps. Printed: both runs' figures and the ratios megatron / zero3.

On 2 CPU cores the tiny model's matrices are too small for tensor parallelism to pay: the figure says what the
engine costs here, not what it gives on GPUs, where the per-rank weight and activation split is the point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {"zero3": ["engine=zero3"], "megatron_tp2": ["engine=megatron", "engine.tp=2"],
        "megatron_tp2_sp": ["engine=megatron", "engine.tp=2", "engine.sequence_parallel=true"],
        "megatron_pp2": ["engine=megatron", "engine.pp=2"], "megatron_dp2": ["engine=megatron"]}
BASELINE = "zero3"


def run(name: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "training.train", f"output_dir={out}", "logger=none", f"model={args.model}", f"stage={args.stage}",
           f"trainer.max_steps={args.steps}", "trainer.save_every=0", f"stage.seq_len={args.seq_len}",
           f"trainer.micro_batch_size={args.micro}", f"trainer.grad_accum={args.accum}", *RUNS[name]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
            "peak_mem_gb": max(r.get("peak_mem_gb", float("nan")) for r in rows),
            "loss": rows[-1]["loss"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.engine_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny_qwen3_vl")
    ap.add_argument("--stage", default="s1_multimodal")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches a step (a pipeline's schedule runs them)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)} ({BASELINE} always)")
    args = ap.parse_args(argv)
    names = [BASELINE] + [n for n in args.runs.split(",") if n and n != BASELINE]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            res[name] = run(name, Path(tmp) / name, args)
    print(f"{args.model}, {args.stage}, seq_len {args.seq_len}, micro-batch {args.micro} rows x {args.accum}, "
          f"{args.steps} steps (first {args.warmup} untimed), 2 processes; baseline {BASELINE}")
    print(f"{'run':>16} | tokens/s | vs {BASELINE} | peak GiB per rank | vs {BASELINE} | last loss")
    b = res[BASELINE]
    for name, r in res.items():
        print(f"{name:>16} | {r['tokens_per_s']:8.0f} | {r['tokens_per_s'] / b['tokens_per_s']:7.2f}x | "
              f"{r['peak_mem_gb']:17.2f} | {r['peak_mem_gb'] / b['peak_mem_gb']:7.2f}x | {r['loss']:.4f}")


if __name__ == "__main__":
    main()
