"""`python -m training.plot DIR [DIR...]`: loss and throughput curves of runs' metrics.jsonl as PNG files.

Writes DIR/plots/{loss,lr,throughput,grad_norm,objective,moe}.png (moe: MoE models only); several DIRs are overlaid in one set of
plots under the first DIR. Skipped steps (loss null) leave gaps instead of fake points.

- lr.png: one line per parameter group (`lr/<group>` keys: vision, merger, llm; a group's `_no_decay` half has
  the same lr and is drawn only where it differs); a run without per-group keys draws the stage's `lr`.
- throughput.png: two panels sharing the step axis, samples/s above and tokens/s below (their scales differ by
  the tokens per sample, so one axis would flatten samples/s).
- moe.png: the router losses above (`moe/aux_loss`, `moe/z_loss`), the expert load per layer below
  (`moe/load_entropy/layer<l>`: 1 = balanced; training/moe.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

NO_DECAY = "_no_decay"


def _lr_keys(keys: set) -> list[str]:
    groups = sorted(k for k in keys if k.startswith("lr/"))
    if groups:
        return groups
    return ["lr"] if "lr" in keys else []


# panel -> subplots, each a function of the run's numeric keys giving the keys drawn there
PANELS = {
    "loss": [lambda ks: sorted(k for k in ks if k == "loss" or k.startswith(("loss/", "eval/loss")))],
    "lr": [_lr_keys],
    "throughput": [lambda ks: [k for k in ("samples_per_s",) if k in ks],
                   lambda ks: [k for k in ("tokens_per_s",) if k in ks]],
    "grad_norm": [lambda ks: [k for k in ("grad_norm",) if k in ks]],
    "objective": [lambda ks: sorted(k for k in ks if k.split("/")[0] in
                                    ("rewards", "logps", "dpo", "reward", "rl", "kl", "gate", "clip"))],
    "moe": [lambda ks: [k for k in ("moe/aux_loss", "moe/z_loss") if k in ks],
            lambda ks: sorted((k for k in ks if k.startswith("moe/load_entropy/")),
                              key=lambda k: int(k.rsplit("layer", 1)[1]))],
}
YLABELS = {"samples_per_s": "samples/s", "tokens_per_s": "tokens/s", "lr": "learning rate"}
STYLES = ("-", "--", ":", "-.")


def read(run: Path) -> list[dict]:
    from training.metrics import read_rows

    return read_rows(run / "metrics.jsonl", tolerant=True)  # a live or killed run's torn last line is skipped


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in rows], [r[key] if _number(r.get(key)) else float("nan") for r in rows]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _drop_same_no_decay(rows: list[dict], keys: list[str]) -> list[str]:
    """lr/<g>_no_decay is left out where lr/<g> exists with the same values (the usual case: one lr per group)."""
    out = []
    for k in keys:
        twin = k[: -len(NO_DECAY)] if k.endswith(NO_DECAY) else None
        if twin in keys and [r.get(k) for r in rows] == [r.get(twin) for r in rows]:
            continue
        out.append(k)
    return out


def figures(runs: list[Path]) -> dict:
    """{panel: matplotlib Figure} for the panels with something to draw (the caller closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: read(run) for run in runs}
    keys = {run: {k for r in rows for k, v in r.items() if _number(v) and k != "step"} for run, rows in data.items()}
    figs = {}
    for panel, subplots in PANELS.items():
        drawn = [[(run, k) for run in runs for k in pick(keys[run])] for pick in subplots]
        if panel == "lr":
            drawn = [[(run, k) for run in runs for k in _drop_same_no_decay(data[run], [k for r, k in d if r == run])]
                     for d in drawn]
        if not any(drawn):
            continue
        fig, axes = plt.subplots(len(subplots), 1, figsize=(7, 4 if len(subplots) == 1 else 6), sharex=True,
                                 squeeze=False)
        for ax, lines in zip(axes[:, 0], drawn):
            for i, (run, k) in enumerate(lines):
                style = STYLES[i % len(STYLES)] if panel == "lr" else "-"  # groups that share an lr stay visible
                ax.plot(*_series(data[run], k), style, label=f"{run.name}: {k}" if len(runs) > 1 else k)
            if lines:
                ax.legend(fontsize=7)
            only = {k for _, k in lines}
            ylabel = YLABELS.get(next(iter(only))) if len(only) == 1 else None
            if ylabel or panel == "lr":
                ax.set_ylabel(ylabel or YLABELS["lr"])
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(panel)
        fig.tight_layout()
        figs[panel] = fig
    return figs


def plot(runs: list[Path], out: Path | None = None) -> list[Path]:
    import matplotlib.pyplot as plt

    out = out or runs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, fig in figures(runs).items():
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
