"""Loss-path memory benchmark (a script, not a test): `python -m training.memory` (CPU, one process per cell).

Why: with the real 151,936-token Qwen vocabulary the LM loss, not the decoder, dominates a long-context step's
memory. Before issue 13 the trainer ran lm_head on every position and took F.cross_entropy of the [L, V] fp32
logits (plus their log-softmax and gradients: several [L, V] fp32 tensors live at once). The trainer's lm path now
is training/vlm.py `weighted_nll`: lm_head on the supervised positions only, `loss_chunk` tokens at a time, each
chunk's gradients computed in the forward (nothing recomputed), so only one chunk's logits exist. This script measures what that buys.

What: ONE training step (forward + backward, no optimizer) of a Qwen3-VL-shaped model (the tiny preset's layers,
training/models.py, but vocab_size=151936; fp32, attn "sdpa_varlen", gradient checkpointing on the decoder) on
one packed text-only row of L tokens (data/pack.py format, one sample per `--sample-len` tokens; the VLM step
then runs its zero-weighted dummy ViT pass), for each L in `--lengths` and each loss path:
  full     hidden = VLM.hidden_states(batch); F.cross_entropy(lm_head(hidden).float()[:, :-1]) on every position
  chunked  the same hidden states; training.vlm.weighted_nll(vlm.lm_head, hidden, labels, weights, vlm.loss_chunk)
Loss = (ce * weights).sum() / weights.sum() in both. Each (path, L) runs in a fresh subprocess: it builds the
model (seed 0) and the batch, records its RSS, resets the peak (VmHWM, /proc/self/clear_refs), runs one warm-up
and `--steps` timed steps (the same step each time), and reports peak RSS minus that baseline ("peak GiB": what the
step itself adds: activations, logits, gradients) and L / (fastest timed step's seconds; best-of because other
load on the machine only ever slows a step down). A child is capped at `--max-gib` of data (RLIMIT_DATA): a cell
that does not fit is reported as "OOM" instead of swapping or killing the machine.

`--objective distill`: the same for stages/distill.py's loss, forward KL to a teacher of the same shape (seed 1):
  full     both models' [L, V] fp32 logits, the per-token divergence of every supervised position (trl GKD's way)
  chunked  the teacher's hidden states of the supervised tokens, then training.vlm.chunked_loss with the objective's
           per-chunk divergence (both models' logits one chunk at a time, gradients computed in the forward)
The teacher's forward (no gradient) is part of the step in both.

Reading the output: "ratio" = full / chunked peak (how many times less memory the step needs with chunking);
"speed" = chunked / full tokens/s (>1: chunked is faster). The children's losses and lm_head gradient norms
must agree between the paths (same model, same batch): their max relative differences are printed and the loss
one asserted < 1e-4. `--json PATH` writes every figure.

`python -m training.memory estimate --model qwen3_vl_8b --seq-len 262144 --sp 8 ...` is the other tool: the
analytic per-rank estimate of a real-size step, nothing run (training/estimate.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

V = 151936  # the real Qwen2/2.5/3-VL vocabulary
BASELINE = "full logits: lm_head on every position, fp32 [L, V], as main before issue 13"
GiB = 2 ** 30


def _status(key: str) -> float:
    """A /proc/self/status memory figure in GiB (VmRSS, VmHWM)."""
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024 / GiB


def build_model(seed: int = 0):
    import torch
    import training.attention  # noqa: F401 - registers attn_implementation="sdpa_varlen"
    from training.models import FAMILIES

    fam = FAMILIES["qwen3_vl"]
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653)
    special = dict(bos_token_id=None, eos_token_id=151645, pad_token_id=151643)
    cfg = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=V, **ids, **special),
                         vision_config=dict(fam.tiny_vision), tie_word_embeddings=False, **ids, **special)
    torch.manual_seed(seed)
    model = fam.model_cls._from_config(cfg, attn_implementation="sdpa_varlen", dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(L: int, sample_len: int, supervised: float) -> dict:
    """One packed row of L text tokens in the data/README.md micro-batch format (samples of `sample_len`; the
    last `supervised` fraction of each sample supervised, its first token never)."""
    import torch
    from data.encode import IGNORE

    g = torch.Generator().manual_seed(1)
    lens = [min(sample_len, L - s) for s in range(0, L, sample_len)]
    input_ids = torch.randint(0, 151643, (1, L), generator=g)  # ordinary tokens, below the special ids
    labels = input_ids.clone()
    sample_ids = torch.empty(1, L, dtype=torch.long)
    sample_sup = torch.empty(1, L, dtype=torch.long)
    pos, at = [], 0
    for i, n in enumerate(lens):
        first = max(1, n - int(round(supervised * n)))
        labels[0, at:at + first] = IGNORE
        sample_ids[0, at:at + n] = i
        sample_sup[0, at:at + n] = n - first
        pos.append(torch.arange(n))
        at += n
    seg = torch.tensor(lens, dtype=torch.int32)
    sup = (labels[:, 1:] != IGNORE).float()
    return dict(input_ids=input_ids, labels=labels, mm_token_type_ids=torch.zeros(1, L, dtype=torch.long),
                sample_ids=sample_ids, sample_sup=sample_sup,
                position_ids=torch.cat(pos).view(1, 1, L).repeat(3, 1, 1),  # text-only M-RoPE: 3 equal rows
                cu_seqlens=torch.nn.functional.pad(seg.cumsum(0, dtype=torch.int32), (1, 0)),
                max_seqlen=int(seg.max()), sources=["default"] * len(lens), weights=sup)


def full_logits_ce(lm_head, hidden, labels):
    """The baseline: [B, L, V] fp32 logits, cross-entropy of every shifted position (IGNORE -> 0)."""
    import torch.nn.functional as F
    from data.encode import IGNORE

    logits = lm_head(hidden).float()
    target = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                           reduction="none").view_as(target)


def distill_loss(path: str, vlm, teacher, batch: dict, hidden):
    """Σ w·KL(teacher‖student) / Σ w over the supervised positions, by full logits or by chunks."""
    import torch
    from stages.distill import divergence
    from training.vlm import _chunks, _supervised, chunked_loss

    w = batch["weights"]
    with torch.no_grad():
        t_hidden, _ = teacher.hidden_states(batch)
    sup, h, t = _supervised(hidden, batch["labels"])
    if path == "full":
        zs = vlm.lm_head(hidden).float()[:, :-1]
        with torch.no_grad():
            zt = teacher.lm_head(t_hidden).float()[:, :-1]
        return (divergence(zs[sup], zt[sup], 0.0) * w[sup]).sum() / w.sum()
    th = t_hidden[:, :-1][sup]
    del t_hidden

    def fn(logits, target, s, e):
        with torch.no_grad():
            zt = teacher.lm_head(th[s:e]).float()
        return divergence(logits, zt, 0.0), logits.new_empty(len(target), 0)

    n = _chunks(len(t), vlm.loss_chunk, h.device, None)
    total, _, _ = chunked_loss(vlm.lm_head, h, t, w[sup].float(), n, vlm.loss_chunk, fn, fused=True)
    return total / w.sum()


def child(path: str, L: int, args) -> dict:
    """One (path, L) cell in this fresh process."""
    import torch
    from training.vlm import VLM, weighted_nll

    torch.set_num_threads(args.threads)
    vlm = VLM(build_model(), loss_chunk=0)
    teacher = VLM(build_model(seed=1)).eval().requires_grad_(False) if args.objective == "distill" else None
    batch = make_batch(L, args.sample_len, args.supervised)

    def step() -> tuple[float, float]:
        hidden, zero = vlm.hidden_states(batch)
        w = batch["weights"]
        ce = None
        if teacher is not None:
            loss = distill_loss(path, vlm, teacher, batch, hidden) + zero
        elif path == "full":
            ce = full_logits_ce(vlm.lm_head, hidden, batch["labels"])
            loss = (ce * w).sum() / w.sum() + zero
        else:
            total, ce = weighted_nll(vlm.lm_head, hidden, batch["labels"], w, vlm.loss_chunk)
            loss = total / w.sum() + zero
        del hidden, ce
        loss.backward()
        gnorm = float(vlm.lm_head.weight.grad.norm())
        vlm.zero_grad(set_to_none=True)
        return float(loss.detach()), gnorm

    base = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    out = dict(path=path, length=L, base_gib=base, loss_chunk=vlm.loss_chunk)
    try:
        step()  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out["loss"], out["lm_head_grad_norm"] = step()
            times.append(time.perf_counter() - t0)
        out["seconds"], out["all_seconds"] = min(times), times
    except (RuntimeError, MemoryError) as e:
        if "memory" not in str(e).lower():
            raise
        out["error"] = f"OOM (> {args.max_gib:g} GiB data)"
        return out
    out["peak_gib"] = _status("VmHWM") - base
    out["tokens_per_s"] = L / out["seconds"]
    return out


def run_cell(path: str, L: int, args) -> dict:
    avail = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024 / GiB
    cap = min(args.max_gib, avail - 2)  # never more than what the machine has free now, less 2 GiB
    cmd = [sys.executable, "-m", "training.memory", "--child", path, str(L), "--max-gib", f"{cap:.2f}",
           "--threads", str(args.threads), "--steps", str(args.steps), "--sample-len", str(args.sample_len),
           "--supervised", str(args.supervised), "--objective", args.objective]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return dict(path=path, length=L, error=f"failed: {tail[0][:120]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["estimate"]:  # the analytic per-rank estimate of a real model (training/estimate.py)
        from training import estimate
        return estimate.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    p.add_argument("--sample-len", type=int, default=1024, help="tokens per packed sample")
    p.add_argument("--supervised", type=float, default=1.0, help="supervised fraction of each sample")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up; the fastest is reported")
    p.add_argument("--max-gib", type=float, default=16.0, help="data cap of one child process")
    p.add_argument("--objective", choices=("lm", "distill"), default="lm",
                   help="the loss measured: the lm objective's CE, or distillation's KL to a teacher")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--child", nargs=2, metavar=("PATH", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        cap = int(args.max_gib * GiB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return

    print(f"one step (forward + backward) of tiny Qwen3-VL layers with V={V}, fp32, sdpa_varlen, gradient "
          f"checkpointing; {args.threads} threads; best of {args.steps} timed steps; samples of "
          f"{args.sample_len} tokens, {args.supervised:.0%} supervised")
    print("peak = RSS high-water mark of the step minus the RSS of the built model and batch")
    if args.objective == "distill":
        print("objective distill: forward KL to a teacher of the same shape (seed 1), its forward in the step")
        print("baseline full logits: both models' [L, V] fp32 logits, the divergence of every supervised position")
        print("chunked: training.vlm.chunked_loss with the per-chunk divergence (stages/distill.py's path)")
    else:
        print(f"baseline {BASELINE}")
        print("chunked: training.vlm.weighted_nll, the lm objective's path (lm_head per chunk of supervised tokens, "
              "gradients computed in the forward)")
    rows, cells = [], []
    hdr = (f"{'length':>6} | {'full GiB':>8} | {'chunked GiB':>11} | {'ratio':>6} | {'full tok/s':>10} | "
           f"{'chunked tok/s':>13} | {'speed':>5}")
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for L in args.lengths:
        full, chunked = run_cell("full", L, args), run_cell("chunked", L, args)
        cells += [full, chunked]
        f_ok, c_ok = "error" not in full, "error" not in chunked
        ratio = full["peak_gib"] / chunked["peak_gib"] if f_ok and c_ok else None
        speed = chunked["tokens_per_s"] / full["tokens_per_s"] if f_ok and c_ok else None
        row = dict(length=L, full_peak_gib=full.get("peak_gib"), chunked_peak_gib=chunked.get("peak_gib"),
                   memory_ratio=ratio, full_tokens_per_s=full.get("tokens_per_s"),
                   chunked_tokens_per_s=chunked.get("tokens_per_s"), speed_ratio=speed)
        if f_ok and c_ok:
            row["loss_rel_diff"] = abs(full["loss"] - chunked["loss"]) / abs(full["loss"])
            row["grad_rel_diff"] = (abs(full["lm_head_grad_norm"] - chunked["lm_head_grad_norm"])
                                    / full["lm_head_grad_norm"])
        rows.append(row)
        note = "; ".join(f"{c['path']}: {c['error']}" for c in (full, chunked) if "error" in c)
        print(f"{L:>6} | {_fmt(row['full_peak_gib'], '8.2f')} | {_fmt(row['chunked_peak_gib'], '11.2f')} | "
              f"{_fmt(ratio, '5.2f') + ('x' if ratio else ''):>6} | {_fmt(row['full_tokens_per_s'], '10.0f')} | "
              f"{_fmt(row['chunked_tokens_per_s'], '13.0f')} | {_fmt(speed, '5.2f')}" + (f"  ({note})" if note else ""),
              flush=True)
    chunk = next((c["loss_chunk"] for c in cells if "loss_chunk" in c), None)
    print(f"chunk = {chunk} tokens (loss_chunk=0: fp32 logits of ~256 MiB a chunk)")
    compared = [r for r in rows if "loss_rel_diff" in r]
    if compared:
        dl = max(r["loss_rel_diff"] for r in compared)
        dg = max(r["grad_rel_diff"] for r in compared)
        print(f"full vs chunked, max relative difference: loss {dl:.2e}, lm_head grad norm {dg:.2e} "
              f"(lengths {', '.join(str(r['length']) for r in compared)})")
        assert dl < 1e-4, f"the two loss paths disagree: relative difference {dl:.2e}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(baseline=BASELINE, objective=args.objective, vocab_size=V, threads=args.threads, sample_len=args.sample_len,
                           supervised=args.supervised, loss_chunk=chunk, rows=rows, cells=cells), f, indent=1)


if __name__ == "__main__":
    main()
