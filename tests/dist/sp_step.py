"""The VLM step under Ulysses sequence parallelism against the same step on one rank (run under torchrun, gloo).

`torchrun --nproc-per-node=N sp_step.py SP [ATTN]` (N a multiple of SP; ATTN the decoder's attention, default
sdpa_varlen; on CUDA machines the step runs on the GPUs over NCCL, flash_attention_2 in bf16 with a bf16 tolerance). Every rank builds the same tiny model and, per
SP group, the same packed batch (several images, a video, text-only samples; rows whose flattened length is not a
multiple of SP). Each case runs the step twice on every rank: once as a plain single-rank VLM (the reference) and
once as a member of its SP group (DeepSpeed's Ulysses attention, training/sp.py's slicing, the ViT split or
replicated). The loss, the per-token values and every parameter gradient (summed over the group, as the engine's
reduction does) must equal the reference's to float32 round-off. Prints "ok <case>" per case.
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.encode import IGNORE  # noqa: E402
from data.pack import PackConfig, collate  # noqa: E402
from test_packing import image_sample, text_sample, video_sample  # noqa: E402
from training.engines.deepspeed import sequence_parallel  # noqa: E402
from training.models import ModelConfig, build  # noqa: E402
from training.train import init_distributed  # noqa: E402
from training.vlm import VLM  # noqa: E402


def batch_of(bundle, kinds, extra, group_index):
    samples = []
    for i, kind in enumerate(kinds):
        j = i + 7 * group_index
        samples.append({"image": lambda: image_sample(bundle, j), "text": lambda: text_sample(bundle, j),
                        "video": lambda: video_sample(bundle, j, t=1 + j % 2)}[kind]())
    cfg = PackConfig(seq_len=max(len(s["input_ids"]) for s in samples) + extra, buffer_size=4,
                     pad_id=bundle.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    return collate(rows, cfg)


def weights_of(batch):
    g = torch.Generator().manual_seed(0)
    return (batch["labels"][:, 1:] != IGNORE).float() * torch.rand(batch["labels"][:, 1:].shape,
                                                                          generator=g).to(batch["labels"].device)


def per_sample(values, batch):
    """A nonlinear per-sample loss (DPO-like: -logsigmoid of each sample's summed log-probs / 10)."""
    ids = batch["sample_ids"][:, 1:]
    n = int(ids.max()) + 1
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, ids.clamp(min=0).flatten(),
                                                          (values * (ids >= 0)).flatten())
    return -torch.nn.functional.logsigmoid(sums / 10).sum()


def run(step, batch, path):
    step.zero_grad()
    if path == "weighted":
        loss, values = step(batch, weights=weights_of(batch))
    else:  # log-probs, a per-sample nonlinear loss of them, and the entropy
        values, ent = step(batch, entropy=True)
        loss = per_sample(values, batch)
        values = torch.stack([values, ent])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    return loss.detach(), values.detach(), grads


def close(a, b, what, tol=2e-5):
    err, scale = float((a - b).norm()), float(b.norm())
    assert err <= tol * scale + 1e-7, (what, err, scale)


def main(sp_size: str, attn: str = "sdpa_varlen") -> None:
    sp_size = int(sp_size)
    rank, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    tol = 3e-2 if dtype is torch.bfloat16 else 2e-5
    group_index = rank // sp_size
    cases = [("qwen2_5_vl", ["image", "text", "video", "image", "text", "image"], 5, "split", "weighted"),
             ("qwen3_vl", ["image", "video", "text", "image", "image", "text"], 3, "split", "weighted"),
             ("qwen3_vl", ["video", "image", "text", "image"], 1, "replicate", "logps"),
             ("qwen2_5_vl", ["text", "image", "text"], 2, "split", "logps"),  # one image: a rank has no share
             ("qwen2_vl", ["text", "text", "text"], 3, "split", "weighted")]  # no media: the dummy ViT
    for family, kinds, extra, vision, path in cases:
        bundle = build(ModelConfig(name=f"tiny_{family}", family=family, attn_implementation=attn))
        bundle.model.to(device, dtype)
        batch = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
                 for k, v in batch_of(bundle, kinds, extra, group_index).items()}  # floats: pixel values
        ref = run(VLM(copy.deepcopy(bundle.model), loss_chunk=7), batch, path)
        step = VLM(bundle.model, loss_chunk=7)
        group = sequence_parallel(step, sp_size, vision)
        step.sp.vision = vision
        loss, values, grads = run(step, batch, path)
        for g in grads.values():  # the engine sums gradients over all processes; here: over the SP group
            dist.all_reduce(g, group=group)
        name = f"{family}/{vision}/{path}/T={batch['input_ids'].numel()}"
        T = batch["input_ids"].numel()  # the step really ran on a slice, and attention on the whole row
        assert step.sp.b - step.sp.a == -(-T // sp_size) < T, name
        ulysses = step.model.language_model.layers[0].self_attn.__dict__["sp_attention"]
        assert ulysses.global_seq_length == step.sp.Tp >= T, name
        close(loss, ref[0], name + " loss", tol)
        close(values, ref[1], name + " values", tol)
        assert grads.keys() == ref[2].keys(), name
        for k in grads:
            close(grads[k], ref[2][k], f"{name} {k}", tol)
        if rank == 0:
            print("ok", name, f"loss={float(loss):.6f}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
