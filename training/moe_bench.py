"""MoE benchmark (a script, not a test): `python -m training.moe_bench` — the tiny MoE model against the tiny dense
model of the same active size, and what the exact global-batch load balancing costs.

Runs, one after the other in this session, the real trainer in one process on the same stage, data and steps:
- `dense_active` (the named baseline): tiny_qwen3_vl with its MLP at intermediate 256, the width a token of the MoE
  model runs (top-2 of 4 experts of 128); attention, ViT and vocabulary are the same;
- `moe`: tiny_qwen3_vl_moe (4 experts, top-2), the checkpoint's aux coefficient, one micro-batch per step;
- `moe_ga2_global` and `moe_ga2_micro`: two accumulation micro-batches per step, the aux loss over the global batch
  (a routing pass first: one more forward per micro-batch) or balanced per micro-batch (`stage.moe.aux_scope`).
Each run's tokens/s is the mean of `tokens_per_s` after `--warmup` steps (metrics.jsonl, the loop's own clock);
peak memory is `peak_mem_gb` (RSS on CPU). Printed: the figures and the ratios to the baseline.

On CPU the MoE block's per-expert loop (HF's implementation indexes each hit expert's token rows) costs more
than one dense matrix of the same FLOPs; the ratio says what routing costs here, not what grouped GEMMs give on GPUs.
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
RUNS = {
    "dense_active": ["model=tiny_qwen3_vl", "+model.tiny.text={intermediate_size: 256}"],
    "moe": ["model=tiny_qwen3_vl_moe"],
    "moe_ga2_global": ["model=tiny_qwen3_vl_moe", "trainer.grad_accum=2", "stage.moe.aux_scope=global"],
    "moe_ga2_micro": ["model=tiny_qwen3_vl_moe", "trainer.grad_accum=2", "stage.moe.aux_scope=micro_batch"],
}


def run(name: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "training.train", f"output_dir={out}", "logger=none", f"stage={args.stage}",
           f"trainer.max_steps={args.steps}", "trainer.save_every=0", f"stage.seq_len={args.seq_len}",
           f"trainer.micro_batch_size={args.micro}", *RUNS[name]]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
            "peak_mem_gb": max(r.get("peak_mem_gb", float("nan")) for r in rows),
            "aux": rows[-1].get("moe/aux_loss"), "loss": rows[-1]["loss"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.moe_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="s1_multimodal")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=2)
    args = ap.parse_args(argv)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            res[name] = run(name, Path(tmp) / name, args)
    base = res["dense_active"]
    print(f"{args.stage}, seq_len {args.seq_len}, micro-batch {args.micro} rows, {args.steps} steps "
          f"(first {args.warmup} untimed), 1 process; baseline dense_active")
    print(f"{'run':>15} | tokens/s | vs baseline | peak GiB | vs baseline | moe/aux_loss | last loss")
    for name, r in res.items():
        aux = "—" if r["aux"] is None else f"{r['aux']:.4f}"
        print(f"{name:>15} | {r['tokens_per_s']:8.0f} | {r['tokens_per_s'] / base['tokens_per_s']:10.2f}x | "
              f"{r['peak_mem_gb']:8.2f} | {r['peak_mem_gb'] / base['peak_mem_gb']:10.2f}x | {aux:>12} | "
              f"{r['loss']:.4f}")


if __name__ == "__main__":
    main()
