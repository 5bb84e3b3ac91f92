"""Engine configuration: CPU offload against the non-offloaded run, and impossible settings failing before any work.

Offload on DS_ACCELERATOR=cpu: parameters and optimizer state already live in host memory, so the engine keeps
torch's AdamW (training/engines/deepspeed.py) and DeepSpeed moves nothing; what the tests check is that DeepSpeed's offload
code paths (ZeRO-1/2 CPU-offload optimizer, ZeRO-3 offloaded optimizer and parameters) train exactly like the
plain ones. They do, bit for bit, with gradient clipping off. With clipping on (every stage's default), the
offloaded ZeRO-1/2 optimizer computes the global gradient norm in its own order, so the clip coefficient can
differ in the last bit and the weights after a few steps differ at float32 round-off (measured 1.2e-7): that
case is checked with a tolerance. With one rank the non-offloaded ZeRO-1/2 references run as stage 0
(training/engines/deepspeed.py `for_world`) while the offloaded runs keep ZeRO: the comparison also pins that stage 0 with
GuardedAdamW steps like ZeRO's flat-buffer optimizer.
"""
import copy
import math
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, run_stage
from training import loop
from training.engine import EngineConfig
from training.engines.deepspeed import GuardedAdamW, deepspeed_config, for_world, use_ds_cpu_adam

STEPS = ["trainer.max_steps=3", "trainer.save_every=0"]
NO_CLIP = "stage.optimizer.grad_clip=0.0"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module's runs: on a busy 2-core machine two OpenMP threads made a 3-step run
    take 20 s instead of 2 (each reference and its offloaded twin run under the same setting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(out: Path, overrides: list[str], monkeypatch) -> tuple[dict, object]:
    """Weights of the HF export after the run, and the DeepSpeed engine the loop used."""
    engines = []
    real = loop.engines.build

    def initialize(*args, **kwargs):
        engine = real(*args, **kwargs)
        engines.append(engine)
        return engine

    monkeypatch.setattr(loop.engines, "build", initialize)
    run_stage(out, [*STEPS, *overrides])
    return load_file(str(out / "hf" / "model.safetensors")), engines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Non-offloaded runs, one per (engine, clipping), trained once for the whole module."""
    cache: dict = {}

    def get(engine: str, clip: bool) -> dict:
        if (engine, clip) not in cache:
            out = tmp_path_factory.mktemp(f"ref_{engine}_{clip}")
            with pytest.MonkeyPatch.context() as mp:
                cache[engine, clip], _ = _train(out, [f"engine={engine}", *([] if clip else [NO_CLIP])], mp)
        return cache[engine, clip]

    return get


def _moved(weights: dict, initial: dict) -> float:
    return max(float((weights[k] - initial[k]).abs().max()) for k in weights)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    run_stage(out, ["trainer.max_steps=0"])
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.parametrize("engine, offload", [
    ("zero1", ["engine.offload_optimizer=true"]),
    ("zero2", ["engine.offload_optimizer=true"]),
    ("zero3", ["engine.offload_optimizer=true"]),
    ("zero3", ["engine.offload_params=true"]),
    ("zero3", ["engine.offload_optimizer=true", "engine.offload_params=true"]),
], ids=["zero1-optimizer", "zero2-optimizer", "zero3-optimizer", "zero3-params", "zero3-both"])
def test_cpu_offload_trains_exactly_like_the_non_offloaded_run(engine, offload, reference, initial, tmp_path,
                                                              monkeypatch):
    weights, eng = _train(tmp_path, [f"engine={engine}", *offload, NO_CLIP], monkeypatch)
    # the offload paths really ran, with the optimizer the engine picks for the CPU accelerator
    assert eng.ds.zero_cpu_offload() == ("engine.offload_optimizer=true" in offload)
    assert bool(eng.ds.zero_offload_param()) == ("engine.offload_params=true" in offload)
    assert type(eng.ds.basic_optimizer) is torch.optim.AdamW
    ref = reference(engine, clip=False)
    assert _moved(ref, initial) > 1e-4  # three real steps happened
    assert all(torch.equal(weights[k], ref[k]) for k in ref), max(
        float((weights[k] - ref[k]).abs().max()) for k in ref)


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_cpu_offload_with_gradient_clipping_matches_within_float32_roundoff(engine, reference, initial, tmp_path,
                                                                           monkeypatch):
    weights, eng = _train(tmp_path, [f"engine={engine}", "engine.offload_optimizer=true"], monkeypatch)
    assert eng.ds.zero_cpu_offload()
    ref = reference(engine, clip=True)
    moved = _moved(ref, initial)
    diff = max(float((weights[k] - ref[k]).abs().max()) for k in ref)
    assert moved > 1e-4 and diff <= 1e-6, (moved, diff)  # round-off of the clip coefficient, not a different step


def test_offload_keeps_torch_adamw_on_the_cpu_accelerator_and_picks_ds_cpu_adam_on_a_gpu(monkeypatch):
    off = EngineConfig(name="zero2", zero_stage=2, offload_optimizer=True)
    assert not use_ds_cpu_adam(off)
    assert deepspeed_config(off, 2, 1, 1, 1.0)["zero_force_ds_cpu_optimizer"] is False
    assert not use_ds_cpu_adam(EngineConfig())

    class Cuda:
        @staticmethod
        def device_name():
            return "cuda"

    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Cuda())
    assert use_ds_cpu_adam(off)
    assert use_ds_cpu_adam(EngineConfig(name="zero3", zero_stage=3, offload_params=True))
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(off, 2, 1, 1, 1.0)
    assert not use_ds_cpu_adam(EngineConfig())  # no offload: torch AdamW on the accelerator


def test_one_rank_runs_zero1_and_zero2_as_stage_0_and_keeps_what_needs_zero():
    assert for_world(EngineConfig(name="zero2", zero_stage=2), 1).zero_stage == 0
    assert for_world(EngineConfig(name="zero1", zero_stage=1), 1).zero_stage == 0
    assert for_world(EngineConfig(name="zero2", zero_stage=2), 2).zero_stage == 2
    assert for_world(EngineConfig(name="zero2", zero_stage=2, offload_optimizer=True), 1).zero_stage == 2
    assert for_world(EngineConfig(name="zero3", zero_stage=3), 1).zero_stage == 3


def _twin_params():
    """Seeded initial tensors and two identical parameter copies of them, for optimizer-against-optimizer tests."""
    torch.manual_seed(0)
    init = [torch.randn(64, 33), torch.randn(50)]
    return init, [torch.nn.Parameter(p.clone()) for p in init], [torch.nn.Parameter(p.clone()) for p in init]


def _decay_groups(params):
    return [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]


def test_guarded_adamw_clips_like_torch_and_skips_a_non_finite_step_untouched():
    """Stage 0's optimizer: torch's clip_grad_norm_ then AdamW, bit for bit, with the pre-clip norm reported; a NaN
    gradient leaves weights and optimizer state as they were and raises `overflow` (DeepSpeed's skip signal)."""
    init, a, b = _twin_params()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_a = GuardedAdamW(_decay_groups(a), max_norm=0.5, **kw)
    opt_b = torch.optim.AdamW(_decay_groups(b), **kw)
    for _ in range(5):
        for pa, pb in zip(a, b):
            pa.grad = 3 * torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        norm = float(torch.nn.utils.clip_grad_norm_(b, 0.5))
        opt_a.step()
        opt_b.step()
        assert not opt_a.overflow and opt_a._global_grad_norm == norm and norm > 0.5  # clipping acted
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    weights, state = [p.detach().clone() for p in a], copy.deepcopy(opt_a.state_dict())
    a[0].grad, a[1].grad = torch.full_like(a[0], float("nan")), torch.randn_like(a[1])
    opt_a.step()
    assert opt_a.overflow and math.isnan(opt_a._global_grad_norm)
    assert all(torch.equal(p, w) for p, w in zip(a, weights))
    after = opt_a.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, st in state["state"].items() for k, v in st.items())


def _cpu_adam_built() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory("cpu_adam", False)) / "cpu_adam.so").is_file()
    except Exception:
        return False


@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeed's cpu_adam op is not built here; its first use "
                    "JIT-compiles it (~2 min on 2 cores). Build it once with: python -c 'from deepspeed.ops.op_builder "
                    "import CPUAdamBuilder; CPUAdamBuilder().load()'")
def test_ds_cpu_adam_steps_like_torch_adamw():
    """The optimizer a GPU run with offload gets: same update as torch AdamW (decoupled decay per group)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    init, a, b = _twin_params()
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_a = DeepSpeedCPUAdam(_decay_groups(a), adamw_mode=True, **kw)
    opt_b = torch.optim.AdamW(_decay_groups(b), **kw)
    for _ in range(10):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb, p0 in zip(a, b, init):
        assert float((pb - p0).abs().max()) > 1e-3
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-5)


# -- impossible settings fail before any work --------------------------------------------------------------------
def _fails(tmp_path: Path, overrides: list[str], match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        run_stage(tmp_path, ["trainer.max_steps=2", *overrides])
    assert not (tmp_path / "config.yaml").exists()  # nothing was set up
    return str(e.value)


@pytest.mark.parametrize("override, match", [
    ("+engine.raw.train_batch_size=7",
     r"engine.raw.train_batch_size=7 .*= 2; it must be a multiple of trainer.micro_batch_size x world size = 2"),
    ("+engine.raw.train_batch_size=8", r"engine.raw.train_batch_size=8 .*set trainer.grad_accum=4 instead"),
    ("+engine.raw.gradient_accumulation_steps=4",
     r"engine.raw.gradient_accumulation_steps=4 contradicts trainer.grad_accum=1; set trainer.grad_accum=4"),
    ("+engine.raw.train_micro_batch_size_per_gpu=3",
     r"contradicts trainer.micro_batch_size=2; set trainer.micro_batch_size=3"),
])
def test_a_batch_geometry_in_engine_raw_that_disagrees_with_the_trainer_fails(override, match, tmp_path):
    _fails(tmp_path, [override], match)


def test_global_batch_is_checked_against_the_world_size():
    cfg = EngineConfig(raw={"train_batch_size": 4})
    deepspeed_config(cfg, micro_batch=2, grad_accum=2, world=1, grad_clip=1.0)  # 2 x 2 x 1 = 4: fine
    with pytest.raises(ValueError, match=r"x world size \(2\) = 8; set trainer.grad_accum=1 instead"):
        deepspeed_config(cfg, micro_batch=2, grad_accum=2, world=2, grad_clip=1.0)
    with pytest.raises(ValueError, match="multiple of trainer.micro_batch_size x world size = 6"):
        deepspeed_config(cfg, micro_batch=2, grad_accum=1, world=3, grad_clip=1.0)


def test_seq_len_below_every_sample_fails_naming_the_length_that_fits(tmp_path):
    msg = _fails(tmp_path, ["stage.seq_len=8"], r"stage.seq_len=8 is shorter than every sample probed")
    assert "['caption', 'vqa']" in msg and "Raise stage.seq_len to at least" in msg


def test_seq_len_must_be_positive(tmp_path):
    _fails(tmp_path, ["stage.seq_len=0"], r"stage.seq_len=0 must be >= 1")


def test_seq_len_below_some_samples_warns_and_runs_on(caplog):
    from training.train import check_sample_lengths, to_job

    job = to_job(compose(["logger=none", "stage.seq_len=30"]))  # captions are 22-36 tokens, vqa 27-39
    with caplog.at_level(logging.WARNING, logger="training"):
        check_sample_lengths(job, rank=0)
    assert "stage.seq_len=30" in caplog.text and "will be dropped" in caplog.text


@pytest.mark.parametrize("override, match", [
    ("stage.trainable=[visoin]", r"stage.trainable names unknown group\(s\) \['visoin'\]; groups are \['vision', "),
    ("stage.trainable=[]", r"stage.trainable is empty: stage 's1_multimodal' would train nothing"),
    ("+stage.lr_mult.projector=0.5", r"stage.lr_mult names unknown group\(s\) \['projector'\]"),
])
def test_unknown_or_empty_trainable_groups_fail_before_the_model_is_built(override, match, tmp_path, monkeypatch):
    from training import models

    monkeypatch.setattr(models, "build", lambda cfg: pytest.fail("the model was built before the config check"))
    _fails(tmp_path, [override], match)


@pytest.mark.parametrize("overrides, match", [
    (["engine=zero2", "engine.offload_params=true"], r"engine.offload_params=true needs engine.zero_stage=3"),
    (["engine.zero_stage=0", "engine.offload_optimizer=true"], r"engine.offload_optimizer=true needs ZeRO"),
    (["engine.dtype=fp16"], r"engine.dtype='fp16'; choose fp32 or bf16"),
])
def test_impossible_engine_settings_fail_before_the_model_is_built(overrides, match, tmp_path, monkeypatch):
    from training import models

    monkeypatch.setattr(models, "build", lambda cfg: pytest.fail("the model was built before the config check"))
    _fails(tmp_path, overrides, match)


def test_seq_len_check_uses_the_tokenizer_and_processor_of_a_model_path(tmp_path):
    """model.path= an HF export: the probe loads its tokenizer and image processor, not its weights."""
    from training.train import check_sample_lengths, to_job

    run_stage(tmp_path / "init", ["model=tiny_qwen2_5_vl", "trainer.max_steps=0"])
    job = to_job(compose(["logger=none", "model=tiny_qwen2_5_vl", f"model.path={tmp_path / 'init' / 'hf'}",
                          "stage.seq_len=8"]))
    with pytest.raises(ValueError, match="stage.seq_len=8 is shorter than every sample probed"):
        check_sample_lengths(job, rank=0)
