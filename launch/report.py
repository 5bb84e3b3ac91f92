"""DIR/report.md after a chain: per step its loss and lr curves, objective metrics (DPO/SAPO when they ran),
and held-out metrics of the step's starting model and of its export (training/evaluate.py).

`python -m launch.report DIR` writes the report of a finished (or partly finished) chain, e.g. after SLURM.
Held-out results are cached per model in DIR/eval_cache.json, so a step's start reuses its predecessor's end.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from training.evaluate import dpo_accuracy
from training.loop import DATA_COUNTERS  # cumulative `<what>/<source>/<reason>` counts and `epoch/<source>`

OBJECTIVE_PREFIXES = ("dpo/", "rpo/", "rewards/", "reward/", "sapo/", "grpo/", "gspo/", "policy/", "distill/",
                      "rollout/")
RATES = ("accuracy", "pass_rate", "clip_frac", "acc_student", "acc_teacher", "on_policy")  # metrics in [0, 1]
OBJECTIVE_KEYS = {"kl", "clip_frac", "ratio", "gate"}


def _objective_keys(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The DPO/SAPO metrics in the rows: (rates in [0, 1] such as preference accuracy, everything else)."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))
                   and (k.startswith(OBJECTIVE_PREFIXES) or k in OBJECTIVE_KEYS)})
    rates = [k for k in keys if k.endswith(RATES)]
    return rates, [k for k in keys if k not in rates]
OBJECTIVE_TITLES = {"dpo": "Preference optimisation (DPO)", "sapo": "Reinforcement learning (SAPO)",
                    "distill": "Strong-to-weak distillation"}


def _rows(d: Path) -> list[dict]:
    f = d / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


def _step_cfg(d: Path) -> dict:
    f = d / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(f), resolve=True) if f.is_file() else {}


def _model_cfg(section: dict, path: str | None):
    from training.models import ModelConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
    cfg.path = path
    return cfg


def _stamp(path) -> str:
    """An export's weights files' mtimes: a step re-run (pipeline.from) writes new weights there."""
    return ",".join(str(f.stat().st_mtime_ns) for f in sorted(Path(path).glob("*.safetensors"))) if path else ""


def _cached_eval(cache_file: Path, model_cfg, settings, teacher: str | None = None) -> dict:
    """Held-out metrics of one model, computed once per (model, samples, seed, teacher)."""
    from training.evaluate import EvalConfig, evaluate

    key = f"{model_cfg.path or 'init:' + model_cfg.name + ':' + str(model_cfg.init_seed)}|{settings.samples}|" \
          f"{settings.seed}|{_stamp(model_cfg.path)}" + (f"|teacher:{teacher}|{_stamp(teacher)}" if teacher else "")
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        cache[key] = evaluate(model_cfg, EvalConfig(samples=settings.samples, seed=settings.seed), teacher)
        cache_file.write_text(json.dumps(cache, indent=1) + "\n")
    return cache[key]


def step_eval(step, settings) -> dict | None:
    """{"start": metrics of the model the step started from, "end": metrics of its hf/ export}."""
    cfg = _step_cfg(step.out)
    if not cfg or not (step.out / "hf" / "config.json").is_file():
        return None
    cache = step.out.parent / "eval_cache.json"
    model = cfg["model"]
    teacher = None  # settings.teacher: a step before this one (pipeline.json's order) whose export exists
    if getattr(settings, "teacher", None):
        t = step.out.parent / settings.teacher / "hf"
        manifest = step.out.parent / "pipeline.json"
        order = [s["name"] for s in json.loads(manifest.read_text())["steps"]] if manifest.is_file() else []
        later = settings.teacher in order and step.name in order and order.index(step.name) > order.index(settings.teacher)
        teacher = str(t) if later and (t / "config.json").is_file() else None
    return {"start": _cached_eval(cache, _model_cfg(model, model.get("path")), settings, teacher),
            "end": _cached_eval(cache, _model_cfg(model, str(step.out / "hf")), settings, teacher)}


def _plot_step(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in rows]
    sources = sorted({k for r in rows for k in r if k.startswith(("loss/", "eval/loss"))})
    panels = [p for p in _objective_keys(rows) if p]
    n = 2 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2))
    ax = axes[0]
    ax.plot(x, [r["loss"] for r in rows], label="loss", lw=1.5)
    for k in sources:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        held_out = k.startswith("eval/")  # every stage.eval.every steps: points joined by a dashed line
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=0.8, alpha=0.8, ls="--" if held_out else "-",
                marker="o" if held_out else None, ms=3)
    ax.set_xlabel("step"), ax.set_title("loss (eval/: held-out)"), ax.legend(fontsize=7)
    ax = axes[1]
    from training.plot import _drop_same_no_decay, _lr_keys

    lrs = _drop_same_no_decay(rows, _lr_keys({k for r in rows for k in r}))  # one line per parameter group
    for k in lrs:
        ax.plot(x, [r.get(k, float("nan")) for r in rows], label=k.removeprefix("lr/"), lw=1)
    if len(lrs) > 1:
        ax.legend(fontsize=7)
    ax.set_xlabel("step"), ax.set_title("learning rate"), ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax, keys in zip(axes[2:], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step"), ax.legend(fontsize=7)
        ax.set_title("accuracies and rates" if keys[0].endswith(RATES) else "rewards and objective terms")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _plot_chain(names: list[str], evals: list[dict | None], png: Path, dpo_steps: set = frozenset()) -> None:
    """Held-out caption loss and VQA accuracy at every boundary of the chain (start, then after each step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(n, e) for n, e in zip(names, evals) if e]
    if not pts:
        return
    labels = ["start"] + [n for n, _ in pts]
    ms = [pts[0][1]["start"]] + [e["end"] for _, e in pts]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.2))
    axes[0].plot(labels, [m["caption_loss"] for m in ms], marker="o")
    axes[0].set_title("held-out caption loss")
    axes[1].plot(labels, [m["vqa_accuracy"] for m in ms], marker="o", label="VQA accuracy")
    axes[1].plot(labels, [m["vqa_chance"] for m in ms], ls="--", color="grey", label="chance")
    axes[1].set_ylim(0, 1), axes[1].set_title("held-out VQA answer accuracy"), axes[1].legend(fontsize=7)
    for key, label in (("rl_reward", "RL reward (greedy)"), ("rl_reward_sampled", "RL reward (sampled, T=1)"),
                       ("pref_accuracy", "prefers chosen (log p)")):
        axes[2].plot(labels, [m.get(key) for m in ms], marker="o", label=label)
    dpo = [dpo_accuracy(e["start"], e["end"]) if n in dpo_steps else None for n, e in pts]
    if any(v is not None for v in dpo):
        axes[2].plot(labels, [None] + dpo, marker="s", ls="", color="C3", label="DPO reward accuracy")
    axes[2].set_ylim(0, 1), axes[2].set_title("held-out preference and RL reward"), axes[2].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)




def _data_counts(d: Path, rows: list[dict]) -> list[str]:
    """Report lines for the step's samples skipped (bad data) or dropped (too long) per source and reason, from
    DONE (else the last metrics row); none when nothing was skipped."""
    try:
        done = json.loads((d / "DONE").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        done = {}
    counts = {k: v for k, v in done.items() if k.startswith(DATA_COUNTERS)}
    if not counts and rows:
        counts = {k: v for k, v in rows[-1].items() if k.startswith(DATA_COUNTERS)}
    epochs = {k.removeprefix("epoch/"): v for k, v in sorted(counts.items()) if k.startswith("epoch/") and v}
    counts = {k: v for k, v in sorted(counts.items()) if v and not k.startswith("epoch/")}
    out = [("Sources read whole and started over (`epoch/<source>`, passes completed): " +
            ", ".join(f"{k} {v}" for k, v in epochs.items())), ""] if epochs else []
    if not counts:
        return out
    out += ["Data skipped (bad records), dropped (too long) or truncated, whole step:", "",
           "| data | source | reason | samples |",
           "|---|---|---|---|"]
    for key, n in counts.items():
        what, rest = key.split("/", 1)
        source, _, reason = rest.rpartition("/")  # a source name may hold a slash, a reason does not
        out.append(f"| {what} | {source} | {reason} | {n} |")
    return out + [""]


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def write_report(out: Path, p=None, steps=None, stopped: str | None = None, evaluate: bool = True) -> Path:
    """Writes out/report.md and out/plots/*.png from the step directories (and pipeline.json)."""
    from launch.pipeline import EvalSettings

    out = Path(out)
    manifest = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").is_file() else {}
    name = p.name if p is not None else manifest.get("name", out.name)
    stopped = stopped if stopped is not None else manifest.get("stopped")
    entries = [(s.name, s.out) for s in steps] if steps is not None else \
        [(s["name"], Path(s["dir"])) for s in manifest.get("steps", [])]
    settings = p.eval if p is not None else EvalSettings()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    class _S:  # the bits of a Step that step_eval needs
        def __init__(self, name, d):
            self.name, self.out = name, d

    ran, evals = [], []
    for step_name, d in entries:
        rows = _rows(d)
        if not (d / "DONE").is_file() and not rows:
            continue
        ran.append((step_name, d, rows, _step_cfg(d)))
        evals.append(step_eval(_S(step_name, d), settings) if evaluate else None)

    kl = any(ev and "teacher_kl" in ev["end"] for ev in evals)
    lines = [f"# Pipeline `{name}`", "", f"Output: `{out}`", ""]
    if stopped:
        lines += [f"> **Stopped early:** {stopped}", ""]
    lines += ["| step | stage | trains | objective | steps | first loss | last loss | held-out caption loss "
              "(start → end) | held-out VQA accuracy (start → end, chance) | held-out RL reward, greedy (sampled) | "
              "held-out DPO preference accuracy |" + (" held-out KL to the teacher (start → end) |" if kl else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if kl else "")]
    for (step_name, d, rows, cfg), ev in zip(ran, evals):
        st = cfg.get("stage", {})
        first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)
        done = "" if (d / "DONE").is_file() else " (unfinished)"
        cap = f"{_fmt(ev['start']['caption_loss'])} → {_fmt(ev['end']['caption_loss'])}" if ev else "–"
        acc = (f"{_fmt(ev['start']['vqa_accuracy'], '.2f')} → {_fmt(ev['end']['vqa_accuracy'], '.2f')} "
               f"({_fmt(ev['end']['vqa_chance'], '.2f')})") if ev else "–"
        rl = (f"{_fmt(ev['start'].get('rl_reward'), '.2f')} → {_fmt(ev['end'].get('rl_reward'), '.2f')} (sampled "
              f"{_fmt(ev['start'].get('rl_reward_sampled'), '.2f')} → {_fmt(ev['end'].get('rl_reward_sampled'), '.2f')})"
              if ev else "–")
        objective = st.get("objective", {}).get("name", "?")
        pref = _fmt(dpo_accuracy(ev["start"], ev["end"]), ".2f") if ev and objective == "dpo" else "–"
        teach = (f" {_fmt(ev['start'].get('teacher_kl'))} → {_fmt(ev['end'].get('teacher_kl'))} |"
                 if ev and "teacher_kl" in ev["end"] else " – |") if kl else ""
        lines.append(f"| {step_name}{done} | {st.get('name', '?')} | {', '.join(st.get('trainable', []))} | "
                     f"{objective} | {rows[-1]['step'] if rows else 0} | "
                     f"{_fmt(first)} | {_fmt(last)} | {cap} | {acc} | {rl} | {pref} |{teach}")
    lines.append("")
    if any(evals):
        dpo_steps = {r[0] for r in ran if r[3].get("stage", {}).get("objective", {}).get("name") == "dpo"}
        _plot_chain([r[0] for r in ran], evals, plots / "held_out.png", dpo_steps)
        lines += ["## Held-out metrics along the chain", "",
                  f"Shapes samples with seed {settings.seed} ({settings.samples} per task), never seen in training: "
                  "mean token cross-entropy of captions; exact-match greedy answers to colour/count questions; "
                  "the mean reward of answers to RL prompts (each record's own reward function), greedy and sampled at "
                  "temperature 1; the share of "
                  "preference pairs whose chosen reply the model gives the higher log-probability; and, for a DPO "
                  "step, DPO's preference accuracy: the share of pairs whose implicit reward margin against the "
                  "step's starting model (the DPO reference) is positive (chance 0.5)."
                  + (f" The KL to the teacher is KL(teacher ‖ model) per answer token of the held-out VQA samples, "
                     f"the teacher being step {settings.teacher}'s export (pipeline.eval.teacher); a distillation "
                     f"step and an SFT step of the same student side by side compare the two ways of training it."
                     if kl else ""),
                  "", "![held-out](plots/held_out.png)", ""]
    for (step_name, d, rows, cfg), ev in zip(ran, evals):
        objective = cfg.get("stage", {}).get("objective", {}).get("name", "lm")
        lines += [f"## {step_name}" + (f": {OBJECTIVE_TITLES[objective]}" if objective in OBJECTIVE_TITLES else ""),
                  ""]
        if rows:
            png = plots / f"{step_name}.png"
            _plot_step(rows, png, f"{step_name} ({cfg.get('stage', {}).get('name', '')})")
            secs = sum(r.get("step_time_s", 0.0) for r in rows)
            lines += [f"{len(rows)} steps, {sum(r.get('tokens', 0) for r in rows):.0f} tokens, "
                      f"{secs:.1f} s of training steps. Log: `{d / 'console.log'}`", "",
                      f"![{step_name}](plots/{png.name})", ""]
            rates, others = _objective_keys(rows)
            if rates or others:
                tail = rows[-min(5, len(rows)):]  # mean of the last few steps: single steps are noisy
                lines += ["| objective metric | first step | mean of the last 5 steps |", "|---|---|---|"]
                for k in rates + others:
                    vals = [r[k] for r in tail if k in r]
                    lines.append(f"| {k} | {_fmt(rows[0].get(k))} | {_fmt(sum(vals) / len(vals) if vals else None)} |")
                lines.append("")
        evals = [r for r in rows if "eval/loss" in r]
        if evals:
            keys = ["eval/loss"] + sorted({k for r in evals for k in r if k.startswith("eval/loss/")})
            lines += [f"Held-out loss (stage.eval: the stage's own loss on fixed held-out samples, every "
                      f"{cfg.get('stage', {}).get('eval', {}).get('every', '?')} steps):", "", "| held-out | step " + str(evals[0]["step"]) + " | step "
                      + str(evals[-1]["step"]) + " |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(evals[0].get(k))} | {_fmt(evals[-1].get(k))} |" for k in keys]
            lines.append("")
        lines += _data_counts(d, rows)
        if ev:
            lines += ["| held-out | start | end |", "|---|---|---|"]
            for k in ("caption_loss", "vqa_accuracy", "vqa_accuracy_colour", "vqa_accuracy_count", "vqa_chance",
                      "rl_reward", "rl_reward_sampled", "pref_accuracy"):
                lines.append(f"| {k} | {_fmt(ev['start'].get(k))} | {_fmt(ev['end'].get(k))} |")
            if objective == "dpo":
                lines.append(f"| DPO preference accuracy vs the start model (chance 0.5) | – | "
                             f"{_fmt(dpo_accuracy(ev['start'], ev['end']))} |")
            ex = ev["end"].get("vqa_examples", [])
            if ex:
                lines += ["", "Answers of the exported model: " + "; ".join(
                    f"*{e['question']}* → `{e['said']}` (truth `{e['answer']}`)" for e in ex)]
            lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.report DIR   (a pipeline output_dir)", file=sys.stderr)
        return 2
    print(write_report(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
