"""Runs the real training loop on fixed, layout-independent global batches.

`python fixed_batches.py OUT KEY=VALUE...` (under torchrun for several ranks). The global batch of every
step is the same packed rows whatever the layout: samples from the shapes generator go through the real
encoder, M-RoPE step and packer once, in one fixed order, and rank r's micro-batch m of a step takes rows
`(m * world + r) * micro ...` (world and r count data-parallel ranks: `sp=2` puts two processes on each row,
parallel.sp_size; `engine=megatron tp=2 pp=2` likewise, engine.tp and engine.pp). So runs with different world sizes / micro-batch sizes / accumulation
steps train on exactly the same global batches and must end with the same weights. `arrange=mixed` gives
rank 0 an image row and rank 1 a text-only row (the ZeRO-3 mixed-batch case).
Arguments with a dot are config overrides (e.g. `stage.objective.teacher=DIR` after `stage=distill`).
The final weights go to OUT/weights.safetensors.
"""
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import rope, shapes  # noqa: E402
from data.encode import EncoderConfig, build_encoder  # noqa: E402
from data.pack import PackConfig, collate  # noqa: E402
from tests.conftest import compose  # noqa: E402
from training import loop  # noqa: E402
from training.train import init_distributed, to_job  # noqa: E402


def rows_for(bundle, tasks, n_rows, seq_len, attention="dense"):
    enc = build_encoder(EncoderConfig(), bundle)
    spec = rope.RopeSpec.from_config(bundle.model.config)
    cfg = PackConfig(seq_len=seq_len, buffer_size=4, pad_id=bundle.tokenizer.pad_token_id, attention=attention)
    packer, rows, i = cfg.build(), [], 0
    while len(rows) < n_rows:
        task = tasks[i % len(tasks)]
        record, media = shapes.generate(shapes.ShapesConfig(), task, i)
        raw = dict(key=f"{task}-{i}", source=task, record=record, media=media)
        rows += packer.add([rope.attach(spec, s) for s in enc.encode(raw)])
        i += 1
    return rows[:n_rows], cfg


class FixedLoader:
    """Rank r's micro-batches of each step, cut from the fixed global rows."""

    def __init__(self, rows, cfg, rank, world, micro, ga):
        self.rows, self.cfg, self.rank, self.world, self.micro, self.ga = rows, cfg, rank, world, micro, ga
        self.step = 0

    def next_step(self):
        per_step = self.world * self.micro * self.ga
        base = self.step * per_step
        self.step += 1
        out = []
        for m in range(self.ga):
            at = base + (m * self.world + self.rank) * self.micro
            out.append(collate(self.rows[at:at + self.micro], self.cfg))
        return out

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

    def metrics(self):  # the loader's data counters: fixed rows skip nothing
        return {}

    def close(self):
        pass


def main(out: str, *args: str) -> None:
    opts = dict(family="qwen2_5_vl", engine="zero2", reduction="token", micro="1", steps="3", arrange="uniform",
                lr="1e-3", sp="1", sp_vision="split", seq_len="256", tasks="caption,vqa,text,grounding",
                attention="dense", stage="s1_multimodal", tp="1", pp="1", ep="1", vpp="1", seqpar="false")
    opts.update(a.split("=", 1) for a in args if "." not in a.split("=", 1)[0])
    extra = [a for a in args if "." in a.split("=", 1)[0]]
    rank, world = init_distributed()
    micro, steps, sp, seq_len = int(opts["micro"]), int(opts["steps"]), int(opts["sp"]), int(opts["seq_len"])
    replica = sp * int(opts["tp"]) * int(opts["pp"])  # an SP (or megatron TP x PP) group's ranks train the same rows
    dp, dp_rank = world // replica, rank // replica
    ga = 4 // (dp * micro) if opts["arrange"] == "uniform" else 2 // dp
    job = to_job(compose([f"stage={opts['stage']}", f"model=tiny_{opts['family']}", f"engine={opts['engine']}", "logger=none",
                          f"output_dir={out}", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={micro}",
                          f"trainer.grad_accum={ga}", "trainer.save_every=0", f"stage.optimizer.lr={opts['lr']}",
                          f"stage.objective.loss_reduction={opts['reduction']}", f"stage.seq_len={seq_len}",
                          f"parallel.sp_size={sp}", f"parallel.sp_vision={opts['sp_vision']}",
                          *([f"engine.tp={opts['tp']}", f"engine.pp={opts['pp']}", f"engine.ep={opts['ep']}",
                               f"engine.vpp={opts['vpp']}", f"engine.sequence_parallel={opts['seqpar']}"]
                            if opts["engine"] == "megatron"
                            else []), *extra]))
    r = loop._setup(job, "", Path(out), rank, world)
    per_step = dp * micro * ga
    if opts["arrange"] == "mixed":  # every step: an image row then a text-only row
        image, cfg = rows_for(r.bundle, ["caption"], 1, 256)
        text, _ = rows_for(r.bundle, ["text"], 1, 256)
        rows = (image + text) * steps
    else:
        rows, cfg = rows_for(r.bundle, opts["tasks"].split(","), per_step * steps, seq_len, opts["attention"])
    r.loader = FixedLoader(rows, cfg, dp_rank, dp, micro, ga)
    loop._start_engine(r, "")
    with loop._StopOnSignal() as stop:
        loop._train(r, stop)
    state = r.engine.full_state_dict(rank=0)
    assert (state is None) == (rank != 0), "the full weights are gathered to rank 0 only"
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "weights.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
