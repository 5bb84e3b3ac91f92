"""`python -m launch.pipeline pipeline=NAME output_dir=DIR [overrides]`: a whole recipe as one command.

The steps of `conf/pipeline/NAME.yaml` run in order, each a `training.train` run in DIR/<step>/ that starts
from the previous step's hf/ export. The trainer's own contract does the rest: a step with DONE is skipped,
a re-run resumes an interrupted step from checkpoints/latest. Every step's config is composed and checked
before anything runs (a typo in step 5 fails in a second, not after step 4), and a step whose objective is
not implemented yet ends the chain there with a message instead of failing after the steps before it.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
log = logging.getLogger("launch")


class StepFailed(RuntimeError):
    """A step exited with an error; the message names the step's console log."""


# ---------------------------------------------------------------- config


@dataclass
class StepConfig:
    """One step of a pipeline: a stage plus the overrides that make it this recipe's stage."""

    stage: str = "???"
    data: str = "pretrain"  # a key of pipeline.data: the mixture this step trains on
    steps: int = 20  # trainer.max_steps
    lr: Optional[float] = None  # stage.optimizer.lr; null: the stage's default
    seq_len: Optional[int] = None  # stage.seq_len; null: the stage's default
    engine: Optional[str] = None  # engine= ; null: pipeline.engine
    nodes: int = 1  # SLURM nodes of this step (launcher=slurm)
    time: Optional[str] = None  # SLURM time limit of this step
    tokens: Optional[float] = None  # the paper's token budget: documentation, shown in the plan
    model: Optional[str] = None  # model= of this step; null: pipeline.model
    # where it starts: null: the export of the step listed before it (the first: pipeline.init_path); a step name:
    # that step's export; "preset": the model preset's own initialisation
    init: Optional[str] = None
    teacher: Optional[str] = None  # distill steps: a step name (its export) or a path: stage.objective.teacher
    exports: dict = field(default_factory=dict)  # {training.train key: an earlier step}: key=<that step's hf/>
    overrides: list = field(default_factory=list)  # any other training.train overrides


@dataclass
class EvalSettings:
    enabled: bool = True  # held-out evaluation of each step's start and end (local/torchrun launchers)
    samples: int = 48
    seed: int = 777_777
    teacher: Optional[str] = None  # a step: every later step's evaluation adds the held-out KL to its export


@dataclass
class PipelineConfig:
    name: str = "tiny"
    model: str = "tiny_qwen3_vl"
    init_path: Optional[str] = None  # model.path of the first step; null: the model preset's own init
    engine: str = "zero2"
    data: dict = field(default_factory=dict)  # mixture name -> training.train data overrides
    common: list = field(default_factory=list)  # overrides every step gets (before its own)
    steps: dict = field(default_factory=dict)  # step name -> StepConfig, in order
    only: list = field(default_factory=list)  # run just these steps (their inputs must exist)
    start: Optional[str] = None  # `pipeline.from`: run from this step on
    max_steps: Optional[int] = None  # set: every step trains this many steps (smoke runs, tests)
    eval: EvalSettings = field(default_factory=EvalSettings)
    device_gib: float = 80.0  # one accelerator's memory: a step whose estimate (training/estimate.py) exceeds it fails
    # model shapes for that estimate while the checkpoints do not exist yet (init_path's config.json wins): a
    # training.estimate preset, e.g. qwen3_vl_8b; null: steps without a config.json are not estimated
    shapes: Optional[str] = None
    teacher: Optional[str] = None  # a local HF directory: the distillation teacher its steps name as ${pipeline.teacher}


@dataclass
class Step:
    """A step as planned: where it writes, where it starts from, the exact trainer arguments."""

    index: int
    name: str
    cfg: StepConfig
    out: Path
    init: Optional[str]  # model.path it starts from (None: the preset's init)
    args: list
    selected: bool = True
    memory_gib: Optional[float] = None  # per-rank estimate, set by check_steps' memory guard

    @property
    def max_steps(self) -> int:
        return int(next(a.split("=", 1)[1] for a in self.args if a.startswith("trainer.max_steps=")))

    @property
    def done(self) -> bool:
        return (self.out / "DONE").is_file()

    @property
    def log_path(self) -> Path:
        return self.out / "console.log"


def pipeline_config(node: DictConfig) -> PipelineConfig:
    """The `pipeline` node as a dataclass; unknown keys and steps without a stage fail with their names."""
    raw = OmegaConf.to_container(node, resolve=True)
    raw["start"] = raw.pop("from", None)
    if raw.get("init_path") == "???":
        raise ValueError(f"pipeline={raw.get('name')} starts from a checkpoint: set pipeline.init_path=<a local "
                         f"{raw.get('model')}-format HF directory> (e.g. a released checkpoint, or your own assembly "
                         f"of the LLM and ViT)")
    steps = raw.pop("steps", {}) or {}
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw))
    except Exception as e:
        raise ValueError(f"pipeline config: {e}".replace("\n", " | ")) from None
    if not steps:
        raise ValueError(f"pipeline {cfg.name!r} has no steps")
    for name, step in steps.items():
        try:
            cfg.steps[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StepConfig), step or {}))
        except Exception as e:
            raise ValueError(f"pipeline.steps.{name}: {e}".replace("\n", " | ")) from None
        if cfg.steps[name].stage == "???":
            raise ValueError(f"pipeline.steps.{name} has no stage; set pipeline.steps.{name}.stage=<a conf/stage name>")
        if cfg.steps[name].data not in cfg.data:
            raise ValueError(f"pipeline.steps.{name}.data={cfg.steps[name].data!r} is not a mixture of "
                             f"pipeline.data ({sorted(cfg.data)})")
    return cfg


def plan(p: PipelineConfig, out: Path) -> list[Step]:
    """Every step with its arguments; `selected` marks the ones pipeline.only / pipeline.from pick."""
    names = list(p.steps)
    for key, picked in (("pipeline.only", list(p.only)), ("pipeline.from", [p.start] if p.start else [])):
        unknown = [n for n in picked if n not in names]
        if unknown:
            raise ValueError(f"{key} names unknown step(s) {unknown}; the steps of {p.name} are {names}")
    exports = lambda n: str(out / n / "hf")  # noqa: E731
    for name, s in p.steps.items():
        for key, ref in [("init", s.init), ("teacher", s.teacher), *((f"exports.{k}", v) for k, v in s.exports.items())]:
            if ref in names and names.index(ref) >= names.index(name) or key.startswith("exports") and ref not in names:
                raise ValueError(f"pipeline.steps.{name}.{key}={ref!r} is not an earlier step; steps run in order {names}")
        if s.init not in (None, "preset") and s.init not in names:
            raise ValueError(f"pipeline.steps.{name}.init={s.init!r}: name an earlier step, 'preset' or leave it null")
    steps, prev = [], p.init_path
    for i, name in enumerate(names):
        s = p.steps[name]
        d = out / name
        start = prev if s.init is None else None if s.init == "preset" else exports(s.init)
        args = [f"stage={s.stage}", f"model={s.model or p.model}", f"engine={s.engine or p.engine}", *p.data[s.data],
                f"trainer.max_steps={p.max_steps if p.max_steps is not None else s.steps}", f"output_dir={d}"]
        if start is not None:
            args.append(f"model.path={start}")
        if s.teacher is not None:
            args.append(f"stage.objective.teacher={exports(s.teacher) if s.teacher in names else s.teacher}")
        args += [f"{k}={exports(v)}" for k, v in s.exports.items()]
        if s.lr is not None:
            args.append(f"stage.optimizer.lr={s.lr}")
        if s.seq_len is not None:
            args.append(f"stage.seq_len={s.seq_len}")
        args += [*p.common, *s.overrides]
        selected = (not p.only or name in p.only) and (not p.start or i >= names.index(p.start))
        steps.append(Step(i, name, s, d, start, args, selected))
        prev = str(d / "hf")
    return steps


# ---------------------------------------------------------------- checks before anything runs


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def step_world(launcher, step: Step) -> int:
    """The number of training processes (the data-parallel size) `launcher` starts for `step`."""
    if launcher.name == "slurm":
        return int(launcher.get("nodes") or step.cfg.nodes) * int(launcher.get("nproc_per_node", 1))
    if launcher.name == "torchrun":
        return int(launcher.get("nproc_per_node", 1)) * int(launcher.get("nnodes", 1))
    return 1


def check_steps(steps: list[Step], world=lambda step: 1, device_gib: Optional[float] = None,
                shapes=None) -> Optional[tuple[Step, str]]:
    """Composes and validates every selected step's trainer config as training.train would (`check_job` with the
    step's process count `world(step)`), so that a setting that cannot work in step 5 fails before step 1 runs.
    With `device_gib`, the memory guard too: a step whose per-rank estimate (training/estimate.py; `shapes`: the
    model's shapes where its model.path has no config.json yet) exceeds it fails with the levers that would fit.

    Returns (step, reason) for the first step whose objective is not implemented yet
    (`stages.build_objective` raises NotImplementedError): the chain stops before it.
    """
    from stages import build_objective
    from training.train import check_job, to_job

    for step in steps:
        if not step.selected:
            continue
        try:
            job = to_job(compose("config", step.args))
        except Exception as e:  # hydra's and to_job's messages name the key
            raise ValueError(f"step {step.name}: {e}") from None
        try:
            check_job(job, world(step))
            build_objective(job.stage.objective)
        except NotImplementedError as e:
            return step, str(e)
        except ValueError as e:
            raise ValueError(f"step {step.name}: {e}") from None
        if device_gib is not None:
            # a step's export keeps its model's shapes: they stand in for the next steps' not-yet-written inputs
            shapes = check_memory(step, job, world(step), device_gib, shapes) or shapes
    return None


def recipe_shapes(p: PipelineConfig):
    """The model shapes a recipe's steps are estimated with before their checkpoints exist: init_path's
    config.json, else the preset named by pipeline.shapes, else None."""
    from training import estimate

    if p.init_path is not None and (Path(p.init_path) / "config.json").is_file():
        return estimate.from_config_json(Path(p.init_path) / "config.json")
    if p.shapes is None:
        return None
    if p.shapes not in estimate.PRESETS:
        raise ValueError(f"pipeline.shapes={p.shapes!r} is not a model-shape preset; choose one of "
                         f"{sorted(estimate.PRESETS)} (or null)")
    return estimate.PRESETS[p.shapes]


def check_memory(step: Step, job, world: int, device_gib: float, shapes=None):
    """The memory guard of one step: ValueError naming the step, its estimate, the device and the levers.
    Returns the model shapes it estimated with (None: unknown, not checked)."""
    from training import estimate

    try:
        plan = estimate.from_job(job, world, shapes)
    except ValueError as e:  # a model.path that does not exist yet and no shapes to stand in
        log.warning("step %s: memory not estimated (%s); set pipeline.shapes to check it", step.name, e)
        return None
    ok, est = estimate.fits(plan, device_gib)
    step.memory_gib = est.device_gib
    if not ok:
        host = (f" and {est.host_gib:.0f} GiB of host memory (more than {estimate.HOST_GIB:g})"
                if est.host_gib > estimate.HOST_GIB else "")
        raise ValueError(
            f"step {step.name}: estimated {est.device_gib:.1f} GiB per rank{host} does not fit pipeline.device_gib="
            f"{device_gib:g} ({world} ranks, {plan.micro_batch_size} x {plan.seq_len} tokens, sp_size "
            f"{plan.sp_size}, ZeRO-{plan.zero_stage}); it fits with: {estimate.describe_levers(plan, device_gib)} "
            f"(add to pipeline.steps.{step.name}.overrides; `python -m training.memory estimate` prints the "
            f"components)")
    return plan.shapes


# ---------------------------------------------------------------- launchers (one machine)


@dataclass
class LauncherConfig:
    """`launcher=local|torchrun` (SLURM has its own config: launch/slurm.py)."""

    name: str = "local"
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None
    rdzv_id: str = "pipeline"


def command(launcher: LauncherConfig, step: Step) -> list[str]:
    """The process that runs `step`: plain python (one process) or torchrun (nproc x nnodes)."""
    if launcher.name == "local":
        return [sys.executable, "-m", "training.train", *step.args]
    if launcher.name != "torchrun":
        raise ValueError(f"launcher.name={launcher.name!r}; choose local, torchrun or slurm")
    if launcher.nproc_per_node < 1 or launcher.nnodes < 1:
        raise ValueError("launcher.nproc_per_node and launcher.nnodes must be at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launcher.nproc_per_node}"]
    if launcher.nnodes == 1 and not launcher.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        if not launcher.rdzv_endpoint:
            raise ValueError(f"launcher.nnodes={launcher.nnodes} needs launcher.rdzv_endpoint=HOST:PORT "
                             "(node 0's address, the same on every node)")
        cmd += [f"--nnodes={launcher.nnodes}", f"--node-rank={launcher.node_rank}",
                f"--rdzv-backend={launcher.rdzv_backend}", f"--rdzv-endpoint={launcher.rdzv_endpoint}",
                f"--rdzv-id={launcher.rdzv_id}-{step.name}"]
    return cmd + ["-m", "training.train", *step.args]


class _Forward:
    """SIGINT/SIGTERM to the runner go to the running step's process group, which checkpoints and exits 143.
    Between steps (an evaluation, the report) the signal is only noted: `run` checks `got` before each step and
    each evaluation and stops there."""

    def __init__(self):
        self.proc, self.got = None, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.got = signum
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)


def run_step(cmd: list[str], step: Step, progress, forward: _Forward) -> int:
    """Runs one step with its console output in step.log_path; shows progress from its metrics.jsonl."""
    step.out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    with step.log_path.open("a") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        logf.flush()
        # own process group: the runner decides what a Ctrl-C means (forward SIGTERM: checkpoint and stop)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        forward.proc = proc
        if forward.got is not None:  # the signal came while the process was being started: stop it too
            os.killpg(proc.pid, signal.SIGTERM)
        while proc.poll() is None:
            progress.update(step)
            time.sleep(0.5)
        forward.proc = None
    progress.update(step, final=True)
    return proc.returncode


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ---------------------------------------------------------------- the runner


def run(cfg: DictConfig, resume: Optional[str] = None) -> int:
    """Runs (or, with launcher=slurm, submits) the chain; returns the process exit code (143: stopped on a
    signal, resumable). `resume` is the command line that re-runs it, shown in that message."""
    from launch.progress import ChainProgress

    p = pipeline_config(cfg.pipeline)
    out = Path(cfg.output_dir).absolute()
    steps = plan(p, out)
    stop = check_steps(steps, lambda step: step_world(cfg.launcher, step), p.device_gib, recipe_shapes(p))
    estimated = [f"{s.name} {s.memory_gib:.1f}" for s in steps if s.memory_gib is not None]
    if estimated:
        log.info("memory estimate per rank (GiB, of %g): %s", p.device_gib, ", ".join(estimated))
    if stop is not None:  # the chain ends before the first step whose objective does not exist yet
        first, reason = stop
        for s in steps[first.index:]:
            s.selected = False
        stopped = f"the chain stops before step {first.name} ({first.cfg.stage}): {reason}"
    else:
        stopped = None
    launcher = cfg.launcher
    if launcher.name == "slurm":
        from launch import slurm

        return slurm.run(slurm.slurm_config(launcher), p, steps, out, dry_run=bool(cfg.dry_run), stopped=stopped)
    lc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LauncherConfig),
                                             OmegaConf.to_container(launcher, resolve=True)))
    selected = [s for s in steps if s.selected]
    if cfg.dry_run:
        for s in selected:
            print(" ".join(command(lc, s)))
        if stopped:
            print(f"# {stopped}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(_manifest(p, steps, stopped), indent=1) + "\n")
    lead = lc.name == "local" or lc.node_rank == 0  # only node 0 evaluates and reports
    progress = ChainProgress(p.name, selected)
    again = f"`{resume}`" if resume else "the same command"
    with _Forward() as forward:
        for step in selected:
            if forward.got is not None:
                progress.message(f"{_signame(forward.got)}: stopped before step {step.name}; re-run to go on from "
                                 f"there: {again}")
                return 143
            if step.done:
                progress.skipped(step)
            else:
                needs = [("starts from", step.init)] if step.init is not None and step.index > 0 else []
                if step.cfg.teacher in p.steps:
                    needs.append(("has the teacher", str(step.out.parent / step.cfg.teacher / "hf")))
                needs += [(f"reads {k} from", str(step.out.parent / v / "hf")) for k, v in step.cfg.exports.items()]
                for what, path in needs:
                    if not Path(path, "config.json").is_file():
                        prev = Path(path).parent.name
                        raise StepFailed(f"step {step.name} {what} {path}, which does not exist; run step {prev} "
                                         f"first (pipeline.from={prev}) or leave out pipeline.only/pipeline.from")
                progress.start(step)
                rc = run_step(command(lc, step), step, progress, forward)
                if not (rc == 0 and step.done) and (rc == 143 or forward.got is not None):
                    progress.message(f"step {step.name} interrupted (exit {rc}): {_checkpoint_state(step)}: {again}. "
                                     f"Log: {step.log_path}")
                    return 143
                if rc != 0 or not step.done:
                    raise StepFailed(f"step {step.name} ({step.cfg.stage}) failed with exit code {rc}; "
                                     f"its log: {step.log_path}")
            if lead and p.eval.enabled:
                from launch.report import step_eval

                if forward.got is not None:
                    progress.message(f"{_signame(forward.got)}: step {step.name} is done; stopped before its held-out "
                                     f"evaluation; re-run to go on (done steps are skipped): {again}")
                    return 143
                progress.evaluated(step, step_eval(step, p.eval))  # a signal now stops after it, below
        if forward.got is not None:
            progress.message(f"{_signame(forward.got)}: every step is done; stopped before the report; re-run to "
                             f"write it (done steps are skipped): {again}")
            return 143
    if stopped:
        progress.message(stopped)
    if lead:
        from launch.report import write_report

        path = write_report(out, p, steps, stopped, evaluate=p.eval.enabled)
        progress.message(f"report: {path}")
    return 0


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def _checkpoint_state(step: Step) -> str:
    """What a re-run of `step` starts from: its newest checkpoint (checkpoints/latest) or the beginning."""
    latest = step.out / "checkpoints" / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if tag.startswith("step_") and tag[5:].isdigit() and (latest.parent / tag).is_dir():
        return f"checkpoint at step {int(tag[5:])} written; re-run to resume"
    return "no checkpoint was written; the step will start over on re-run"


def _manifest(p: PipelineConfig, steps: list[Step], stopped: Optional[str]) -> dict:
    """pipeline.json: what the report needs to read the run back without the Hydra config."""
    return {"name": p.name, "model": p.model, "stopped": stopped,
            "steps": [{"name": s.name, "stage": s.cfg.stage, "dir": str(s.out), "init": s.init,
                       "max_steps": s.max_steps, "selected": s.selected, "args": s.args} for s in steps]}


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: Hydra overrides for conf/launch.yaml; `--dry-run`, and `--cfg` to print the composed config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    unknown = [f for f in flags if f not in ("--dry-run", "--cfg")]
    if unknown:
        print(f"unknown flag(s) {unknown}; use --dry-run, --cfg, and Hydra overrides key=value", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        overrides.append("dry_run=true")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = compose("launch", overrides)
        if "--cfg" in flags:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        return run(cfg, resume=shlex.join(["python", "-m", "launch.pipeline", *argv]))
    except (ValueError, StepFailed) as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except Exception as e:  # Hydra's composition errors (unknown option, bad override) read well as they are
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            print(f"pipeline: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
