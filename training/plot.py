"""`python -m training.plot DIR [DIR...]`: loss and throughput curves of runs' metrics.jsonl as PNG files.

Writes DIR/plots/{loss,lr,throughput,grad_norm,objective}.png; several DIRs are overlaid in one set of
plots under the first DIR. Skipped steps (loss null) leave gaps instead of fake points.
"""
from __future__ import annotations

import sys
from pathlib import Path

PANELS = {
    "loss": lambda k: k == "loss" or k.startswith("loss/"),
    "lr": lambda k: k == "lr",
    "throughput": lambda k: k in ("tokens_per_s", "samples_per_s"),
    "grad_norm": lambda k: k == "grad_norm",
    "objective": lambda k: k.split("/")[0] in ("rewards", "logps", "dpo", "reward", "rl", "kl", "gate", "clip"),
}


def read(run: Path) -> list[dict]:
    from training.metrics import read_rows

    return read_rows(run / "metrics.jsonl", tolerant=True)  # a live or killed run's torn last line is skipped


def plot(runs: list[Path], out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or runs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    data = {run: read(run) for run in runs}
    written = []
    for panel, wanted in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for run, rows in data.items():
            keys = sorted({k for r in rows for k, v in r.items() if wanted(k) and isinstance(v, (int, float))})
            for k in keys:
                steps = [r["step"] for r in rows]
                vals = [r.get(k) if isinstance(r.get(k), (int, float)) else float("nan") for r in rows]
                ax.plot(steps, vals, label=f"{run.name}: {k}" if len(runs) > 1 else k)
                drawn = True
        plt.close(fig) if not drawn else None
        if not drawn:
            continue
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> None:
    runs = [Path(a) for a in argv]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if not runs or missing:
        sys.exit(f"usage: python -m training.plot RUN_DIR [RUN_DIR...]; no metrics.jsonl in {missing}")
    for p in plot(runs):
        print(p)


if __name__ == "__main__":
    main(sys.argv[1:])
