"""training/mcore/optim.py `DataParallel` against the engine's hand-made data parallelism (torchrun, 4 processes,
gloo, CPU).

`torchrun --nproc-per-node=4 mcore_optim.py [layout ...]`. Three layouts on the same 4 processes (megatron's
parallel state rebuilt between them, as the engine builds it): dp2 x tp2 (Qwen3-VL: q/k-norm partial gradients
summed over TP), dp2 x pp2 (Qwen3-VL with tied embeddings: the embedding's gradient summed with its head copy's on
the last stage; DeepStack features crossing the stages; rank order tp-pp-dp) and dp4 x ep2 (Qwen3-VL-MoE: the
experts split over two EP ranks, reduced over the expert-data-parallel group of two, a second optimizer part).
Every rank builds the same tiny HF model; each run starts from a fresh copy of it: the ViT (replicated over TP,
unused on the second stage) and the Decoder chunk of the rank's (tp, pp, ep) (pipeline.py `build_chunks`), in
four optimizer groups (vision and llm at different learning rates, each with a no-decay group, as
training/engine.py `optimizer_groups` makes them). Data-parallel rank r trains its own packed micro-batches
(tests/test_mcore_pp.py `microbatches`: two per rank at dp2, one at dp4) through megatron's schedule (ViT on the
first stage, loss sums, 1F1B at pp2), three steps, clipped at CLIP (far below the norms, so clipping is on).

- "ref": the oracle, the engine's step before DataParallel, copied here: torch AdamW, `finalize_grads` on .grad,
  one all-reduce per parameter over the DP group, the engine's `_grad_norm` (float64), clip_grads_with_norm_.
- "dist" (DistributedOptimizer) and "plain" (distributed=False): `finish_grads`, `step(CLIP)`; one of them with
  small DDP buckets (several buckets; the distributed optimizer shards each). Checked after every step: every
  parameter of the rank equals the oracle's (RTOL/ATOL: the reductions sum in another order), the norm equals the
  oracle's (NORM_RTOL), p.grad stays None (the gradients live in main_grad); "dist" holds Adam state for about
  1/dp of the parameters, "plain" for all.
- resume: the state (the module's weights and `DataParallel.state_dict()`, through torch.save and
  torch.load(weights_only=True)) saved after step 2, a fresh build loaded with it, step 3: bit-identical
  parameters to the uninterrupted run's step 3 (both modes; at pp2 in bf16 too, where the distributed optimizer
  keeps fp32 main shards and the plain one fp32 main copies).
- bf16 (pp2): both modes against the fp32 oracle loosely (norms within BF16_NORM_RTOL), the DP replicas' weights
  identical after each step, fp32 main parameters.
- a non-finite gradient on one rank: every rank skips (norm nan, skipped), parameters and Adam state untouched,
  the buffers zeroed.
Prints "ok <layout> <check>" per check.
"""
import copy
import io
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_mcore import lm_state, tiny  # noqa: E402
from test_mcore_pp import SEQ_LEN, deepstack_layers, forward_step, microbatches  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from training.engine import _no_decay  # noqa: E402
from training.mcore import pipeline, shim  # noqa: E402
from training.mcore.optim import DataParallel  # noqa: E402

# family, tied, tp, pp, ep
LAYOUTS = {"dp2tp2": ("qwen3_vl", False, 2, 1, 1), "dp2pp2": ("qwen3_vl", True, 1, 2, 1),
           "dp4ep2": ("qwen3_vl_moe", False, 1, 1, 2)}
STEPS, CLIP, BETAS, EPS = 3, 1.0, (0.9, 0.95), 1e-8
LRS = {"vision": 1e-3, "llm": 3e-3}
WEIGHT_DECAY = 0.1
# parameters: the reductions sum in another order, and Adam's m / sqrt(v) turns the rounding of a gradient near
# zero into up to ~1e-6 of a parameter (measured: <= 8e-7 at lr 3e-3, on a handful of elements); norms: megatron's
# in float32 against the engine's float64 (measured: <= 4e-6 relative)
RTOL, ATOL, NORM_RTOL = 1e-5, 2e-6, 1e-5
BF16_NORM_RTOL = 0.05
SMALL_BUCKETS = 100_000  # elements: several buckets of the ~2.5M-parameter model


def say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"ok {msg}", flush=True)


def init(tp: int, pp: int, ep: int) -> None:
    """The engine's parallel state (training/engines/megatron.py Engine.__init__)."""
    if pp > 1:
        pipeline.init_model_parallel(tp, pp, seed=1234, order="tp-pp-dp")
    else:
        shim.init_model_parallel(tp, seed=1234, ep=ep)


def build(base, dtype):
    """A fresh run: (bundle for forward_step, chunks, the step module, optimizer groups)."""
    model = copy.deepcopy(base).to(dtype)
    chunks = pipeline.build_chunks(model.config.get_text_config(), lm_state(base), dtype)
    vit, llm = model.model.visual, torch.nn.ModuleList(chunks)
    module = torch.nn.ModuleDict({"vit": vit, "llm": llm})
    groups = []
    for name, part in (("vision", vit), ("llm", llm)):
        for decay in (True, False):
            params = [p for n, p in part.named_parameters() if _no_decay(n, p) != decay]
            groups.append({"params": params, "name": name + ("" if decay else "_no_decay"), "group": name,
                           "lr": LRS[name], "weight_decay": WEIGHT_DECAY if decay else 0.0})
    return SimpleNamespace(model=model), chunks, module, groups


def forward_backward(bundle, chunks, mbs) -> None:
    pipeline.forward_backward(chunks, partial(forward_step, bundle), mbs, seq_length=SEQ_LEN,
                              deepstack_layers=deepstack_layers(bundle))


def params_of(module) -> dict:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def weights_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- the oracle: the engine's step before DataParallel
def engine_grad_norm(params, chunk) -> float:
    """training/engines/megatron.py `_grad_norm`."""
    ep = ps.get_expert_model_parallel_world_size()
    expert = [ep > 1 and chunk.expert_parallel(p) for p in params]
    copy_ = [p for p in params if getattr(p, "shared_embedding", False)]
    experts = [p.grad for p, e in zip(params, expert) if e]
    sharded = [p.grad for p, e in zip(params, expert) if chunk.sharded(p) and not any(p is c for c in copy_)
               and not e]
    replicated = [p.grad for p, e in zip(params, expert) if not chunk.sharded(p) and not e]
    zero = torch.zeros((), dtype=torch.float64)
    sq = sum((g.double().pow(2).sum() for g in sharded), zero)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    if experts:
        sq_e = sum((g.double().pow(2).sum() for g in experts), zero)
        dist.all_reduce(sq_e, group=ps.get_expert_model_parallel_group())
        sq = sq + sq_e
    sq = sq + sum((g.double().pow(2).sum() for g in replicated), torch.zeros((), dtype=torch.float64))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_pipeline_model_parallel_group())
    return float(sq.sqrt())


@torch.no_grad()
def engine_step(opt, chunks) -> tuple[float, bool]:
    """training/engines/megatron.py `Engine.step` before DataParallel (dense)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    pipeline.finalize_grads(chunks)
    dp, ep = ps.get_data_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    if dp > 1:
        for p in params:
            own = ep > 1 and chunks[0].expert_parallel(p)  # this EP rank's experts: their replicas
            if not own or dp > ep:
                dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group() if own else
                                ps.get_data_parallel_group())
    norm = engine_grad_norm(params, chunks[0])
    skipped = norm != norm or norm in (float("inf"), float("-inf"))
    if not skipped:
        torch.nn.utils.clip_grads_with_norm_(params, CLIP, torch.tensor(norm))
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


def run_ref(base, mbs, dtype=torch.float32):
    bundle, chunks, module, groups = build(base, dtype)
    opt = torch.optim.AdamW(groups, betas=BETAS, eps=EPS)
    out = []
    for _ in range(STEPS):
        forward_backward(bundle, chunks, mbs)
        norm, skipped = engine_step(opt, chunks)
        assert not skipped
        out.append((params_of(module), norm))
    return out


# ---------------------------------------------------------------- DataParallel
def make_dp(module, chunks, groups, distributed, bucket_size):
    return DataParallel(module, chunks, groups, BETAS, EPS, chunks[0].config, distributed=distributed,
                        bucket_size=bucket_size)


def dp_step(dp, bundle, chunks, module, mbs) -> float:
    forward_backward(bundle, chunks, mbs)
    assert all(p.grad is None for g in dp.param_groups for p in g["params"])
    assert all(p.grad is None for p in module.parameters() if p.requires_grad)
    dp.finish_grads()
    norm, skipped = dp.step(CLIP)
    assert not skipped, norm
    return norm


def run_dp(base, mbs, distributed, bucket_size, dtype=torch.float32):
    """(per step (params, norm), the state saved after step 2, the DataParallel, module)."""
    bundle, chunks, module, groups = build(base, dtype)
    dp = make_dp(module, chunks, groups, distributed, bucket_size)
    assert {g["name"] for g in dp.param_groups} == {g["name"] for g in groups}  # experts: split per part
    assert dp.experts == [False] + [True] * (ps.get_expert_model_parallel_world_size() > 1)
    assert all(g["lr"] == LRS[g["group"]] for g in dp.param_groups)
    if bucket_size is not None and ps.get_pipeline_model_parallel_rank() == 0:  # megatron buckets stage 0 only
        assert sum(len(b.buckets) for b in dp.ddp.buffers) > 2
    out, saved = [], None
    for step in range(STEPS):
        norm = dp_step(dp, bundle, chunks, module, mbs)
        out.append((params_of(module), norm))
        if step == STEPS - 2:
            buf = io.BytesIO()
            torch.save({"model": weights_of(module), "optimizer": dp.state_dict()}, buf)
            saved = buf.getvalue()
    return out, saved, dp, module


def resume(base, mbs, distributed, bucket_size, saved: bytes, dtype=torch.float32) -> dict:
    bundle, chunks, module, groups = build(base, dtype)
    dp = make_dp(module, chunks, groups, distributed, bucket_size)
    state = torch.load(io.BytesIO(saved), weights_only=True)
    missing, unexpected = module.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), (missing, unexpected)
    dp.load_state_dict(state["optimizer"])
    dp_step(dp, bundle, chunks, module, mbs)
    return params_of(module)


def compare(label: str, got: list, ref: list) -> None:
    for step, ((p, n), (rp, rn)) in enumerate(zip(got, ref)):
        assert abs(n - rn) <= NORM_RTOL * rn, (label, step, n, rn)
        assert p.keys() == rp.keys()
        for k in rp:
            torch.testing.assert_close(p[k], rp[k], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k: f"{label} step {step} {k}: {m}")


def same_over_dp(label: str, params: dict) -> None:
    """The data-parallel replicas hold identical weights."""
    flat = torch.cat([v.float().flatten() for v in params.values()])
    parts = [torch.empty_like(flat) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(parts, flat, group=ps.get_data_parallel_group())
    assert all(torch.equal(parts[0], x) for x in parts), label


def check_sharding(label: str, dp, module, distributed: bool) -> None:
    """Adam state: with the distributed optimizer each rank of a part's data-parallel group (experts: the
    expert-data-parallel one) holds its ~1/size of the part, the group all of it once; else every rank all."""
    for opt, expert in zip(dp.optimizers, dp.experts):
        group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        total = sum(p.numel() for p in module.parameters()
                    if p.requires_grad and (not getattr(p, "allreduce", True)) == expert)
        mine = sum(s["exp_avg"].numel() for s in opt.optimizer.state.values())
        every = torch.tensor([mine])
        dist.all_reduce(every, group=group)
        if distributed:
            size = dist.get_world_size(group)
            assert int(every) == total and (size == 1 or mine < 0.75 * total), (label, mine, int(every), total)
        else:
            assert mine == total, (label, mine, total)


@torch.no_grad()
def check_skip(label: str, dp, module) -> None:
    """A NaN in one rank's gradient: every rank skips the step and changes nothing."""
    before = params_of(module)
    steps = [float(s["step"]) for opt in dp.optimizers for s in opt.optimizer.state.values()]
    params = [p for p in module.parameters() if p.requires_grad]  # all in the groups
    for p in params:
        p.main_grad.fill_(1.0)
    if dist.get_rank() == 0:
        params[0].main_grad.view(-1)[0] = float("nan")
    dp.finish_grads()
    norm, skipped = dp.step(CLIP)
    assert skipped and norm != norm, (label, norm, skipped)
    after = params_of(module)
    assert all(torch.equal(before[k], after[k]) for k in before), label
    assert steps == [float(s["step"]) for opt in dp.optimizers for s in opt.optimizer.state.values()], label
    assert all(not p.main_grad.any() for p in params), label


def layout(name: str) -> None:
    family, tied, tp, pp, ep = LAYOUTS[name]
    bundle = tiny(family, tied)
    base = bundle.model
    init(tp, pp, ep)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    n = 4 // dp_size
    mbs = microbatches(bundle, 4)[n * dp_rank:n * (dp_rank + 1)]  # each DP rank its own rows
    buckets = {"dist": SMALL_BUCKETS if pp == 1 else None, "plain": None if pp == 1 else SMALL_BUCKETS}

    ref = run_ref(base, mbs)
    for mode, distributed in (("dist", True), ("plain", False)):
        got, saved, dp, module = run_dp(base, mbs, distributed, buckets[mode])
        compare(f"{name} {mode}", got, ref)
        check_sharding(f"{name} {mode}", dp, module, distributed)
        say(f"{name} {mode} equals the engine's step (3 steps, clipped)")
        check_skip(f"{name} {mode}", dp, module)
        say(f"{name} {mode} skips a non-finite step")
        again = resume(base, mbs, distributed, buckets[mode], saved)
        assert all(torch.equal(again[k], got[-1][0][k]) for k in again), f"{name} {mode} resume"
        say(f"{name} {mode} resumes bit-identically")
    if pp > 1:  # bf16: fp32 main parameters, a smoke test against the fp32 oracle, and the resume
        for mode, distributed in (("dist", True), ("plain", False)):
            got, saved, dp, module = run_dp(base, mbs, distributed, buckets[mode], torch.bfloat16)
            for (p, n), (_, rn) in zip(got, ref):
                assert abs(n - rn) <= BF16_NORM_RTOL * rn and all(v.isfinite().all() for v in p.values()), (n, rn)
                same_over_dp(f"{name} bf16 {mode}", p)
            assert all(p.dtype == torch.float32 for g in dp.param_groups for p in g["params"])
            assert all(p.dtype == torch.bfloat16 for p in module.parameters())
            again = resume(base, mbs, distributed, buckets[mode], saved, torch.bfloat16)
            assert all(torch.equal(again[k], got[-1][0][k]) for k in again), f"{name} bf16 {mode} resume"
            say(f"{name} bf16 {mode} trains and resumes bit-identically")


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    for name in sys.argv[1:] or LAYOUTS:  # all layouts unless named
        layout(name)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
