"""Runs the real loop with fixed micro-batches: one with an image, one text-only.

`python mixed_batch.py FAMILY OUT ENGINE` under torchrun with 2 ranks gives rank 0 the image micro-batch and
rank 1 the text-only one; with 1 process both arrive as 2 accumulation micro-batches of one step. The final
weights go to OUT/weights.safetensors, so a test can compare the two runs.
"""
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.encode import IGNORE  # noqa: E402
from data.loader import collate  # noqa: E402
from tests.conftest import compose  # noqa: E402
from training import loop  # noqa: E402
from training.train import init_distributed, to_job  # noqa: E402


def samples(bundle):
    tok, ip = bundle.tokenizer, bundle.image_processor
    img = Image.new("RGB", (96, 64), (200, 30, 30))
    vis = ip(images=[img], return_tensors="pt")
    n = int(vis["image_grid_thw"].prod()) // 4
    text = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>A red picture.<|endoftext|>"
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    image = dict(input_ids=ids, labels=torch.where(ids == pad, IGNORE, ids), mm_token_type_ids=(ids == pad).long(),
                 pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"], source="image")
    tids = torch.tensor(tok.encode("Only words here, no picture at all.<|endoftext|>", add_special_tokens=False))
    text_only = dict(input_ids=tids, labels=tids.clone(), mm_token_type_ids=torch.zeros_like(tids), source="text")
    return image, text_only


class FixedLoader:
    """The same micro-batches every step: rank r of a 2-rank run gets sample r, a 1-rank run gets both."""

    def __init__(self, micro):
        self.micro = micro

    def next_step(self):
        return [dict(mb) for mb in self.micro]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main(family: str, out: str, engine: str) -> None:
    job = to_job(compose([f"model=tiny_{family}", f"engine={engine}", "logger=none", f"output_dir={out}",
                          "trainer.max_steps=3", "trainer.micro_batch_size=1", "trainer.save_every=0",
                          "stage.optimizer.lr=1e-3"]))
    rank, world = init_distributed()
    job.trainer.grad_accum = 2 // world
    r = loop._setup(job, "", Path(out), rank, world)
    pad = r.bundle.tokenizer.pad_token_id
    pair = samples(r.bundle)
    r.loader = FixedLoader([collate([pair[rank]], pad)] if world == 2 else [collate([s], pad) for s in pair])
    loop._start_engine(r, "")
    with loop._StopOnSignal() as stop:
        loop._train(r, stop)
    state = loop._full_state_dict(r.engine)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "weights.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
