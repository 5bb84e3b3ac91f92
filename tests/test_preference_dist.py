"""DPO and SAPO as whole stages: 2 ranks under ZeRO-2/3 through torchrun, DPO's split independence, exact resume
mid-stage, and rollouts that run the ViT once per prompt (not once per completion)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHORT_ROWS, clean_env, load_hf, metrics_rows

TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Stage runs through the real CLI entry point; the shapes RL rewards (exact answers) are replaced by one a random
# tiny model earns on about half its completions, so groups differ, advantages are non-zero and SAPO trains.
ENTRY = r'''
import sys
sys.path.insert(0, REPO)
from stages import rewards

def odd_length(completion, answer, **_):
    return float(len(rewards.clean(completion)) % 2)

rewards.REGISTRY.update(numeric=odd_length, exact_match=odd_length)
from training.train import main
main()
'''

DPO = ["stage=dpo", "stage.mixture={preference: 1}", "model=tiny_qwen2_5_vl", "trainer.micro_batch_size=1",
       "stage.optimizer.lr=1e-4"]
SAPO = ["stage=sapo", "stage.mixture={rl: 1}", "model=tiny_qwen3_vl", "trainer.micro_batch_size=1",
        "stage.objective.num_generations=4", "stage.objective.max_new_tokens=6", "stage.optimizer.lr=1e-4"]


def _entry(tmp: Path) -> Path:
    script = tmp / "entry.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + ENTRY)
    return script


def _stage(tmp: Path, out: Path, overrides: list[str], nproc: int = 2) -> None:
    launcher = TORCHRUN2 if nproc == 2 else [sys.executable]
    p = subprocess.run(launcher + [str(_entry(tmp)), SHORT_ROWS, "logger=none", f"output_dir={out}", *overrides],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _ckpt_state(out: Path, rank: int = 0) -> dict:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / f"trainer_rank{rank}.json").read_text())


def _hf_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "hf" / "model.safetensors"))


# -- 1. both objectives, 2 ranks, ZeRO-2 and ZeRO-3 ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3"])  # ZeRO-2 on 2 ranks: test_sapo.py, the DPO split test
@pytest.mark.parametrize("objective", ["dpo", "sapo"])
def test_two_rank_stage_finishes_with_metrics_checkpoint_and_export(objective, engine, tmp_path):
    """torchrun 2 ranks: the stage runs to the end, every step trains with a finite loss, the objective's metrics
    are logged, each rank's checkpoint state and the full-weight HF export are written."""
    out = tmp_path / "run"
    steps = 4
    overrides = (DPO if objective == "dpo" else SAPO) + [f"engine={engine}", f"trainer.max_steps={steps}"]
    _stage(tmp_path, out, overrides)
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["skipped"] is None and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    if objective == "dpo":
        keys = {"dpo/loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "loss/preference", "entropy"}
        assert all(keys <= r.keys() for r in rows)
        assert abs(rows[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at the first step
    else:
        assert all({"policy/gate", "policy/ratio", "entropy", "loss/rl"} <= r.keys() for r in rows)
        rollout_steps = [r for r in rows if "reward/mean" in r]  # one rollout per mini_batches=2 steps
        assert [r["step"] for r in rollout_steps] == [1, 3]
        assert all(0 < r["reward/mean"] < 1 for r in rollout_steps)
    assert (out / "DONE").is_file() and (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert {p.name for p in (out / "checkpoints" / f"step_{steps:08d}").glob("trainer_rank*.json")} == {
        "trainer_rank0.json", "trainer_rank1.json"}
    from training.models import ModelConfig, build

    family = "qwen2_5_vl" if objective == "dpo" else "qwen3_vl"
    init = dict(build(ModelConfig(family=family)).model.named_parameters())
    w = load_hf(out / "hf")  # loads with transformers; ZeRO-3 shards gathered to full shapes
    assert all(w[k].shape == init[k].shape for k in init)
    changed = {k for k in init if not torch.equal(w[k], init[k])}
    assert changed and not any(".visual.blocks." in k or "patch_embed" in k for k in changed)  # ViT frozen


# -- DPO: the gradient does not depend on the split of the global batch -------------------------------------------
DPO_FIXED = r'''
import json, sys
from pathlib import Path
sys.path[:0] = [REPO, REPO + "/tests/dist"]
from safetensors.torch import save_file
from fixed_batches import FixedLoader, rows_for
from tests.conftest import compose
from training import loop
from training.train import init_distributed, to_job

out, engine, micro, sp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rank, world = init_distributed()
steps = 3
job = to_job(compose(["stage=dpo", "model=tiny_qwen2_5_vl", f"engine={engine}", "logger=none", f"output_dir={out}",
                      f"trainer.max_steps={steps}", f"trainer.micro_batch_size={micro}", "trainer.grad_accum=1",
                      "trainer.save_every=0", "stage.optimizer.lr=1e-3", "stage.seq_len=256",
                      f"parallel.sp_size={sp}"]))
r = loop._setup(job, "", Path(out), rank, world)
# pairs packed once, in one fixed order (varlen rows: what sequence parallelism needs)
rows, cfg = rows_for(r.bundle, ["preference"], 2 * steps, 256, "varlen")
r.loader = FixedLoader(rows, cfg, rank // sp, world // sp, micro, 1)  # one data stream per SP group
seen, weights = [], r.objective.weights

def checked(mb):
    """Every pair of the micro-batch is whole: its chosen and rejected sample share one row."""
    where = {}
    for sid, m in enumerate(mb["meta"]):
        row = int((mb["sample_ids"] == sid).any(1).nonzero()[0])
        where.setdefault(m["group"], []).append((m["kind"], row))
    for g, parts in where.items():
        assert sorted(k for k, _ in parts) == ["chosen", "rejected"] and parts[0][1] == parts[1][1], (g, parts)
    seen.append(sorted(where))
    return weights(mb)

r.objective.weights = checked
loop._start_engine(r, "")
with loop._StopOnSignal() as stop:
    loop._train(r, stop)
state = r.engine.full_state_dict(rank=0)
Path(out, f"groups_rank{rank}.json").write_text(json.dumps(seen))
if rank == 0:
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "weights.safetensors"))
'''


def _dpo_fixed(tmp: Path, name: str, nproc: int, engine: str, micro: int, sp: int = 1):
    from safetensors.torch import load_file

    script, out = tmp / "dpo_fixed.py", tmp / name
    script.write_text(f"REPO = {str(REPO)!r}\n" + DPO_FIXED)
    launcher = TORCHRUN2 if nproc == 2 else [sys.executable]
    p = subprocess.run(launcher + [str(script), str(out), engine, str(micro), str(sp)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    groups = [json.loads((out / f"groups_rank{r}.json").read_text()) for r in range(0, nproc, sp)]  # one per DP rank
    per_step = [sorted(g for rank in groups for g in rank[s]) for s in range(len(groups[0]))]
    return metrics_rows(out), load_file(str(out / "weights.safetensors")), per_step


@pytest.fixture(scope="module")
def dpo_one_rank(tmp_path_factory):
    """1 rank taking each step's whole global batch (2 packed rows) in one micro-batch (built once)."""
    return _dpo_fixed(tmp_path_factory.mktemp("dpo_one"), "one", 1, "zero2", 2)


@pytest.mark.slow
@pytest.mark.parametrize("engine,sp", [("zero2", 1), ("zero3", 1), ("zero2", 2)])
def test_dpo_two_ranks_equal_one_rank_with_the_same_global_batch(engine, sp, tmp_path, dpo_one_rank):
    """2 ranks x 1 micro-batch (or, sp=2, one SP group of 2 taking both rows) end with the weights and log the losses
    of 1 rank that takes the same global batch at once; no pair is ever split over micro-batches or ranks (checked on
    every micro-batch of both layouts). Under SP the policy and the frozen reference both run sequence-parallel."""
    one = dpo_one_rank
    two = _dpo_fixed(tmp_path, "two", 2, engine, 2 if sp == 2 else 1, sp)
    assert two[2] == one[2] and all(len(s) >= 2 for s in one[2])  # the same pairs in every step
    for key in ("loss", "dpo/loss", "rewards/accuracy", "rewards/margin"):
        assert [r[key] for r in two[0]] == pytest.approx([r[key] for r in one[0]], rel=1e-5, abs=1e-7), key
    assert one[0][-1]["rewards/margin"] != 0  # the policy moved away from the reference
    for k in one[1]:  # float32 round-off of the gradient sums, far below one Adam step (lr 1e-3)
        torch.testing.assert_close(two[1][k], one[1][k], rtol=0, atol=5e-5, msg=k)
    init = _dpo_initial()
    assert any(not torch.equal(one[1][k], init[k]) for k in init)  # it trained


def _dpo_initial() -> dict:
    from training.models import ModelConfig, build

    return build(ModelConfig(family="qwen2_5_vl")).model.state_dict()


# -- 2. resume mid-stage -----------------------------------------------------------------------------------------
def _rewind(src: Path, dst: Path, step: int) -> None:
    """What a SIGKILL after step `step`'s checkpoint leaves: later checkpoints never written, no export, no DONE;
    the killed run's metrics rows past the checkpoint are still on disk (the resume must drop them)."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for d in ckpts.glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    shutil.rmtree(dst / "hf")
    (dst / "DONE").unlink()
    assert len(metrics_rows(dst)) > step


def _positions(state):
    """A checkpoint's trainer state without the shard readers' `members` counters: for a seekable .tar the reader
    resumes from the byte offset and counts members from there, so that counter (used only for pipe/compressed
    shards, where it is the position) differs after a resume while the position itself does not."""
    if isinstance(state, dict):
        return {k: _positions(v) for k, v in state.items() if k != "members"}
    if isinstance(state, list):
        return [_positions(v) for v in state]
    return state


def _assert_resumed_identically(ref: Path, out: Path, from_step: int) -> None:
    got, want = metrics_rows(out), metrics_rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # the step counter continues, nothing twice
    timing = ("tokens_per_s", "samples_per_s", "step_time_s", "data_wait_frac", "flops_per_s", "peak_mem_gb", "mfu")
    for g, w in zip(got[from_step:], want[from_step:]):
        assert {k: v for k, v in g.items() if k not in timing} == {k: v for k, v in w.items() if k not in timing}
    for rank in (0, 1) if (ref / "checkpoints" / f"step_{len(want):08d}" / "trainer_rank1.json").exists() else (0,):
        assert _positions(_ckpt_state(out, rank)) == _positions(_ckpt_state(ref, rank))  # data and objective state
    a, b = _hf_weights(out), _hf_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dpo_resume_mid_stage_is_bit_exact(tmp_path):
    """2 ranks, ZeRO-3 (the reference model sharded too): a run restarted from its step-2 checkpoint logs exactly the
    losses and metrics of the uninterrupted run from step 3 on and ends with bit-identical weights."""
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    common = DPO + ["engine=zero3", "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=10"]
    _stage(tmp_path, ref, common)
    _rewind(ref, out, 2)
    _stage(tmp_path, out, common)
    assert "resumed from" in (out / "train.log").read_text()
    _assert_resumed_identically(ref, out, 2)


@pytest.mark.slow
def test_sapo_resume_mid_rollout_is_exact(tmp_path):
    """mini_batches=2: after step 1 the second mini-batch of the rollout is still queued, after step 2 the prompts of
    step 2 wait for the next rollout. Restarting from either checkpoint continues the step counter and trains on
    exactly what the uninterrupted run trained on (no prompt replayed or lost, same sampled completions): every
    logged metric, the final data/objective state and the weights are bit-identical."""
    ref = tmp_path / "ref"
    common = SAPO + ["engine=zero2", "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_checkpoints=10",
                     "stage.objective.kl_beta=0.05"]
    _stage(tmp_path, ref, common, nproc=1)
    rows = metrics_rows(ref)
    assert all(r["skipped"] is None for r in rows) and len({r["loss"] for r in rows}) == 4
    state1 = json.loads((ref / "checkpoints" / "step_00000001" / "trainer_rank0.json").read_text())["objective"]
    state2 = json.loads((ref / "checkpoints" / "step_00000002" / "trainer_rank0.json").read_text())["objective"]
    assert len(state1["queue"]) == 1 and not state1["stash"]  # the checkpoints do hold a buffer to restore
    assert not state2["queue"] and state2["stash"]
    for k in (1, 2):
        out = tmp_path / f"resumed_{k}"
        _rewind(ref, out, k)
        _stage(tmp_path, out, common, nproc=1)
        _assert_resumed_identically(ref, out, k)


# -- 3. the ViT runs once per prompt in rollouts -------------------------------------------------------------------
def _count_vit_rows(model) -> tuple[list, object]:
    rows: list[int] = []

    def hook(module, args, kwargs):
        rows.append(int((args[0] if args else kwargs["hidden_states"]).shape[0]))

    return rows, model.model.visual.register_forward_pre_hook(hook, with_kwargs=True)


def _hf_num_return_sequences(module, prompts, n, pad, stops, temperature, max_new):
    """The previous rollout code: pixel_values through HF generate with num_return_sequences."""
    from stages.rollout import _cat_visual

    P = max(len(p["input_ids"]) for p in prompts)
    batch = {k: torch.zeros(len(prompts), P, dtype=torch.long) for k in ("input_ids", "attention_mask",
                                                                        "mm_token_type_ids")}
    batch["input_ids"][:] = pad
    for i, p in enumerate(prompts):
        k = len(p["input_ids"])
        batch["input_ids"][i, P - k:], batch["attention_mask"][i, P - k:] = p["input_ids"], 1
        batch["mm_token_type_ids"][i, P - k:] = p["mm_token_type_ids"]
    _cat_visual(prompts, batch)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    module.eval()
    seqs = module.generate(**batch, **sampling, max_new_tokens=max_new, num_return_sequences=n, eos_token_id=stops,
                           pad_token_id=pad, use_cache=True)
    out = []
    for row in seqs[:, P:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_rollout_generation_runs_the_vit_once_per_prompt(family):
    """G completions per prompt: the ViT sees each prompt's patches once; sampled rollouts equal the previous code's
    (HF num_return_sequences) token for token under the same seed, and greedy rollouts equal generating from G
    copies of every prompt (which ran the ViT G times)."""
    from test_dpo import tiny
    from test_sapo import _prompts

    from stages.rollout import generate

    b = tiny(family)
    prompts = _prompts(b)
    prompts.append(dict(prompts[0], meta=dict(prompts[0]["meta"], key="q2")))  # a second image prompt
    pad, stops = b.tokenizer.pad_token_id, [b.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    patches = sum(len(p["pixel_values"]) for p in prompts if "pixel_values" in p)
    G = 4
    rows, hook = _count_vit_rows(b.model)
    try:
        torch.manual_seed(0)
        new = generate(b.model, prompts, G, pad, stops, 1.0, 1.0, 6, synced=False)
        assert rows == [patches], rows  # one ViT call on every prompt's patches once
        rows.clear()
        torch.manual_seed(0)
        assert new == _hf_num_return_sequences(b.model, prompts, G, pad, stops, 1.0, 6)
        rows.clear()
        greedy = generate(b.model, prompts, G, pad, stops, 0.0, 1.0, 6, synced=False)
        assert rows == [patches]
        rows.clear()
        copies = [p for p in prompts for _ in range(G)]
        assert greedy == _hf_num_return_sequences(b.model, copies, 1, pad, stops, 0.0, 6)
        assert rows == [G * patches]  # what running the ViT per completion costs
    finally:
        hook.remove()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_rollout_log_prob_passes_run_the_vit_once_per_prompt_per_micro_batch(family):
    """A rollout micro-batch stores a prompt's image once for all its completions; log-probs and gradients equal
    the per-completion layout (each row with its own copy of the image), with 1/G of the ViT rows."""
    from test_dpo import tiny
    from test_sapo import _prompts

    from stages.rollout import collate_sequences, token_logps

    b = tiny(family)
    prompts = [dict(p, source=p["meta"]["source"]) for p in _prompts(b)]  # as split_samples gives them
    G = 3
    owners = [p for p in prompts for _ in range(G)]
    comps = [[100 + i, 200, 300 + i][: 1 + i % 3] for i in range(len(owners))]  # plain text tokens
    pad = b.tokenizer.pad_token_id
    shared = collate_sequences(owners, comps, pad)
    copied = collate_sequences([dict(p) for p in owners], comps, pad)  # distinct dicts: no sharing
    assert shared["pixel_values"].shape[0] * G == copied["pixel_values"].shape[0]
    merger = [p for n, p in b.model.named_parameters() if ".merger." in n]
    rows, hook = _count_vit_rows(b.model)
    try:
        results = []
        for batch in (shared, copied):
            b.model.zero_grad()
            lp, _ = token_logps(b.model, batch)
            lp.sum().backward()
            results.append((lp.detach(), [p.grad.clone() for p in merger]))
    finally:
        hook.remove()
    assert rows == [16, 16 * G]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    # the shared image's gradient is summed over its rows in another order than G separate ViT passes: float32
    # round-off, judged against each gradient's norm (single near-zero elements differ by ~1e-6 with 2 threads)
    for a, c in zip(results[0][1], results[1][1]):
        assert float((a - c).norm()) <= 1e-5 * float(c.norm()) + 1e-9, (float((a - c).norm()), float(c.norm()))
    assert any(float(g.abs().sum()) > 0 for g in results[0][1])


ZERO3_ROLLOUT = r'''
import json, os, sys, types
sys.path[:0] = [REPO, REPO + "/tests"]
import torch
from training.train import init_distributed
from training import models
from training.loop import JobConfig
from training.engine import EngineConfig, build as build_engine
from training.vlm import VLM
from stages.objective import Context
from stages import StageConfig, rollout
from stages.sapo import RLObjective, Config as SC
from test_dpo import pack
from test_sapo import _prompts
rank, world = init_distributed()
family = sys.argv[1]
job = JobConfig()
job.model = models.ModelConfig(name=f"tiny_{family}", family=family)
job.engine = EngineConfig(name="zero3", zero_stage=3)
job.stage = StageConfig(name="rl", trainable=["merger", "llm"])
job.trainer.micro_batch_size, job.trainer.grad_accum = 1, 1
b = models.build(job.model)
plain = models.build(job.model).model  # the same starting weights, unsharded: the single-process reference
groups = models.param_groups(b.model, b.family)
models.apply_trainable(b.model, groups, job.stage.trainable)
prompts = _prompts(b)
mine = [prompts[0]] if rank == 0 else [prompts[1]]  # rank 0: an image prompt; rank 1: text only
engine = build_engine(VLM(b.model), groups, job.stage, job.engine, 1, 1, world, 10)
tok = b.tokenizer
pad, stops = tok.pad_token_id, [tok.convert_tokens_to_ids("<|im_end|>")]
rows = []
engine.model.model.visual.register_forward_pre_hook(
    lambda m, a, k: rows.append(int((a[0] if a else k["hidden_states"]).shape[0])), with_kwargs=True)
out = {}
# greedy: identical to the unsharded model; the text-only rank joins the ViT's all-gathers with a dummy image
out["greedy"] = rollout.generate(engine, mine, 3, pad, stops, 0.0, 1.0, 3 + 3 * rank, synced=True)
out["plain"] = rollout.generate(plain, mine, 3, pad, stops, 0.0, 1.0, 3 + 3 * rank, synced=False)
out["vit_rows"] = list(rows)
# a whole RL step: sampled rollouts, the shared-image log-prob passes, backward and step on every rank
mb = pack(plain, [[p] for p in mine], pad)
rl = RLObjective(SC(num_generations=4, max_new_tokens=4, drop_equal_groups=False, mini_batches=1,
                    rewards={"odd_length": "reward_helpers:odd_length"}))
run = Context(engine, b, lambda: engine.build_frozen(VLM(models.build(job.model).model)))
rl.setup(run)
step = rl.prepare(engine, [mb])[0]
step["weights"] = rl.weights(step)
ls, _ = rl.loss_sum(engine, rollout.on(step, engine.device))
engine.backward(ls); engine.step()
out["loss"], out["rows"] = float(ls), int(step["input_ids"].shape[0])
out["images"] = int(step["pixel_values"].shape[0]) if "pixel_values" in step else 0
open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w").write(json.dumps(out))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # torn down at interpreter exit, gloo's threads can abort the process
'''


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_zero3_rollouts_with_an_image_on_one_rank_only(family, tmp_path):
    """ZeRO-3, 2 ranks, rank 0 rolls out an image prompt and rank 1 a text-only one (ranks also decode different
    lengths): generation and the RL step finish (the text-only rank runs a dummy ViT where the other runs the real
    one), the ViT sees the prompt's patches once, greedy rollouts equal the unsharded model's."""
    script = tmp_path / "zero3_rollout.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + ZERO3_ROLLOUT)
    p = subprocess.run(TORCHRUN2 + [str(script), family, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in (r0, r1):
        assert r["greedy"] == r["plain"] and len(r["greedy"]) == 3
        assert math.isfinite(r["loss"]) and r["rows"] == 4
    assert r0["vit_rows"][0] == 16 and r1["vit_rows"][0] == 4  # the prompt's 16 patches once; a 2x2 dummy
    assert r0["images"] == 16 and r1["images"] == 0  # rollout micro-batch: the image once for its 4 rows
