"""training/estimate.py and launch.pipeline's memory guard: parameter counts equal the HF models' (built on the
meta device; MoE included), the per-layer activation formulas equal what autograd keeps on tiny models, the scaling with
sp_size and offload, the CLI's table and verdict, levers that really make a too-big plan fit, and every step of
the real recipes passing the guard (a step that cannot fit refused with the levers). No training, no torchrun."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env
from launch.pipeline import check_steps, compose, pipeline_config, plan, recipe_shapes, step_world
from training import estimate
from training.models import FAMILIES, param_groups

# The real shapes as their HF config.json spells them (Qwen/Qwen3-VL-8B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct,
# Qwen/Qwen2-VL-7B-Instruct); keys left out take transformers' defaults, as from_pretrained would
HF = {
    "qwen3_vl_8b": ("qwen3_vl",
                    dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=12288, vocab_size=151936),
                    dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                         out_hidden_size=4096, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
    # Qwen/Qwen3-VL-32B-Instruct: the Qwen3-32B decoder, the same ViT with a 5120-wide merger output
    "qwen3_vl_32b": ("qwen3_vl",
                     dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                          head_dim=128, intermediate_size=25600, vocab_size=151936),
                     dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          out_hidden_size=5120, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
    "qwen2_5_vl_7b": ("qwen2_5_vl",
                      dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064),
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    # Qwen/Qwen2.5-VL-72B-Instruct: the 7B's ViT with a 3456-wide MLP and a merger out to 8192
    "qwen2_5_vl_72b": ("qwen2_5_vl",
                       dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                            intermediate_size=29568, vocab_size=152064),
                       dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, patch_size=14,
                            out_hidden_size=8192, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen2_vl_7b": ("qwen2_vl",
                    dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064),
                    dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, hidden_size=3584)),
    # Qwen/Qwen3-VL-30B-A3B-Instruct and Qwen/Qwen3-VL-235B-A22B-Instruct: every layer a sparse MoE block
    "qwen3_vl_30b_a3b": ("qwen3_vl_moe",
                         dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                              head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                              num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936),
                         dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                              out_hidden_size=2048, num_position_embeddings=2304,
                              deepstack_visual_indexes=[8, 16, 24])),
    "qwen3_vl_235b_a22b": ("qwen3_vl_moe",
                           dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                                head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
                                num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936),
                           dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                                out_hidden_size=4096, num_position_embeddings=2304,
                                deepstack_visual_indexes=[8, 16, 24])),
}


def _hf_counts(cfg, family: str) -> dict:
    """Parameters per group (training/models.py's own grouping) of the HF model built on the meta device."""
    fam = FAMILIES[family]
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    shapes = dict(model.named_parameters())
    return {g: sum(shapes[n].numel() for n in names) for g, names in param_groups(model, fam).items()}


@pytest.mark.parametrize("name", sorted(HF))
def test_parameter_counts_equal_the_hf_model(name):
    family, text, vision = HF[name]
    cfg = FAMILIES[family].config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False)
    assert estimate.from_hf(cfg) == estimate.PRESETS[name]  # the preset's numbers are the checkpoint's
    counts = estimate.PRESETS[name].params()
    assert counts == _hf_counts(cfg, family)  # vision, merger and llm (the text model) each exact
    if name == "qwen3_vl_8b":
        assert round(sum(counts.values()) / 1e9, 2) == 8.77  # the model card's 8.77B
    if name == "qwen2_5_vl_72b":
        assert round(sum(counts.values()) / 1e9, 1) == 73.4  # the model card's 73.4B
    if name == "qwen3_vl_30b_a3b":  # the checkpoint's safetensors hold 31,070,754,032 weights (the card's ~31B)
        assert sum(counts.values()) == 31_070_754_032 and counts["experts"] == 48 * 3 * 128 * 768 * 2048


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_preset_counts_and_config_json(family, tmp_path):
    fam = FAMILIES[family]
    shapes = estimate.tiny(family)
    cfg = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=shapes.text.vocab),
                         vision_config=dict(fam.tiny_vision), tie_word_embeddings=False)
    assert shapes.params() == _hf_counts(cfg, family)
    cfg.save_pretrained(tmp_path)  # the config.json an export writes reads back to the same shapes
    assert estimate.from_config_json(tmp_path) == shapes == estimate.shapes_of(f"tiny_{family}")


def test_the_tiny_moe_model_counts_every_expert():
    """model=tiny_qwen3_vl_moe as training.models builds it: the estimator's parameters (all experts of every layer,
    for parameters, gradients and optimizer states) are the model's, leaf group by leaf group."""
    from training import models
    from training.models import ModelConfig, build

    model = build(ModelConfig(name="tiny_qwen3_vl_moe", family="qwen3_vl_moe")).model
    shapes = estimate.shapes_of("tiny_qwen3_vl_moe")
    counts = shapes.params()
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    assert counts == {g: sum(named[n].numel() for n in names)
                      for g, names in param_groups(model, FAMILIES["qwen3_vl_moe"]).items()}
    assert estimate.SUBGROUPS == models.SUBGROUPS
    # a dense MLP kept in mlp_only_layers (and off decoder_sparse_step) counts as dense
    mixed = {"text": {"mlp_only_layers": [0], "decoder_sparse_step": 2}}
    model = build(ModelConfig(name="tiny_qwen3_vl_moe", family="qwen3_vl_moe", tiny=mixed)).model
    assert estimate.tiny("qwen3_vl_moe", mixed).text.sparse_layers == 2  # layers 1 and 3
    assert sum(estimate.tiny("qwen3_vl_moe", mixed).params().values()) == sum(p.numel() for p in model.parameters())
    est = estimate.estimate(estimate.Plan(shapes, seq_len=1024, world=4, zero_stage=3))
    total = sum(counts.values())
    assert est.part("optimizer states").device == total * 12 / 4 and est.part("gradients").device > total * 2 / 4


def test_moe_trainable_leaves_and_the_gathered_moe_block():
    """`llm` is dense + router + experts; a stage training only the routers pays their optimizer state alone; ZeRO-3
    gathers one whole MoE block (a leaf module) when it is larger than lm_head, a teacher's when that is larger."""
    s = estimate.PRESETS["qwen3_vl_30b_a3b"]
    counts, T = s.params(), s.text
    assert s.leaves(("merger", "llm")) == ("merger", "dense", "router", "experts")
    plan = estimate.Plan(s, seq_len=8192, world=64, zero_stage=3, trainable=("merger", "router"))
    est = estimate.estimate(plan)
    assert est.part("optimizer states").device == (counts["merger"] + counts["router"]) * 12 / 64
    block = T.experts * (1 + 3 * T.moe_intermediate) * T.hidden  # 0.6B > V x hidden = 0.31B
    assert est.part("ZeRO-3 working set").device == (block + estimate.PREFETCH_BUCKET) * 2
    big = estimate.PRESETS["qwen3_vl_235b_a22b"].text
    distill = estimate.estimate(replace(plan, objective="distill", teacher=estimate.PRESETS["qwen3_vl_235b_a22b"]))
    assert distill.part("ZeRO-3 working set").device == (big.router_params() + big.expert_params()
                                                         + estimate.PREFETCH_BUCKET) * 2
    found = estimate.levers(replace(plan, seq_len=262144, checkpointing=False), 80)
    assert found and all("tiled_mlp" not in c for c in found)  # TiledMLP does not run MoE blocks: never named
    with pytest.raises(ValueError, match="'router' is not a group of this qwen3_vl model"):
        estimate.PRESETS["qwen3_vl_8b"].leaves(("router",))


def test_model_tiny_changes_reach_the_model_and_the_estimate():
    """model=tiny_qwen3_vl_small (model.tiny: 2 layers, hidden 96): the built model and the estimator's shapes of
    that job agree exactly; a distill job's plan counts its teacher."""
    from conftest import compose
    from training.models import build
    from training.train import to_job

    job = to_job(compose(["model=tiny_qwen3_vl_small"]))
    model = build(job.model).model
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 96
    plan = estimate.from_job(job, 1)
    fam = FAMILIES["qwen3_vl"]
    assert plan.shapes.params() == {g: sum(dict(model.named_parameters())[n].numel() for n in names)
                                    for g, names in param_groups(model, fam).items()}
    assert plan.teacher is None
    job = to_job(compose(["model=tiny_qwen3_vl_small", "stage=distill", "stage.objective.teacher=/not/yet"]))
    est = estimate.estimate(estimate.from_job(job, 1, fallback=estimate.tiny("qwen3_vl")))
    part = next(p for p in est.parts if p.name == "teacher model")
    assert part.device == sum(estimate.tiny("qwen3_vl").params().values()) * 4  # fp32, one rank


def _saved_bytes(run, params) -> int:
    """Bytes of the distinct storages autograd keeps for backward during `run()`, parameters left out."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


def _decoder_saved(family: str, layers: int, T: int, dtype, experts: str = "") -> int:
    fam = FAMILIES[family]
    cfg = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=64, num_hidden_layers=layers),
                         vision_config=dict(fam.tiny_vision))
    model = fam.model_cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if experts:  # MoE: transformers' experts implementation (default grouped_mm)
        model.set_experts_implementation(experts)
    text = model.model.language_model.train()
    x = torch.randn(1, T, cfg.text_config.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(T).view(1, 1, T).expand(3, 1, T)
    return _saved_bytes(lambda: text(inputs_embeds=x, position_ids=pos, use_cache=False), text.parameters())


def _vit_saved(family: str, depth: int, side: int, dtype) -> int:
    fam = FAMILIES[family]
    vision = dict(fam.tiny_vision, depth=depth)
    vision.update({k: [] for k in ("deepstack_visual_indexes",) if k in vision})
    vision.update({k: list(range(depth)) for k in ("fullatt_block_indexes",) if k in vision})
    cfg = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=64), vision_config=vision)
    vit = fam.model_cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype).model.visual.train()
    pixels = torch.randn(side * side, 3 * 2 * fam.patch_size ** 2, dtype=dtype)
    return _saved_bytes(lambda: vit(pixels, grid_thw=torch.tensor([[1, side, side]])), vit.parameters())


@pytest.mark.parametrize("family,dtype", [("qwen3_vl", torch.float32), ("qwen3_vl", torch.bfloat16),
                                          ("qwen2_5_vl", torch.bfloat16), ("qwen2_vl", torch.bfloat16)])
def test_layer_formulas_equal_what_autograd_keeps(family, dtype):
    """The per-layer and per-block figures against a measurement: the saved tensors of 4 layers minus those of 2
    (what is outside the layers cancels), per layer and token, on the tiny models (CPU's flash SDPA kernel keeps,
    like flash-attention, only q, k, v, out and the log-sum-exp). fp32 and bf16 differ by HF's fp32 upcasts."""
    shapes, b, T, side = estimate.tiny(family), dtype.itemsize, 128, 8
    layer = (_decoder_saved(family, 4, T, dtype) - _decoder_saved(family, 2, T, dtype)) / 2 / T
    assert layer == pytest.approx(estimate.layer_bytes(shapes.text, b, 1, 0)[0], rel=0.01)
    block = (_vit_saved(family, 4, side, dtype) - _vit_saved(family, 2, side, dtype)) / 2 / side ** 2
    assert block == pytest.approx(estimate.block_bytes(shapes.vision, b)[0], rel=0.01)


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_formula_equals_what_autograd_keeps(experts, dtype):
    """A sparse MoE layer (every tiny MoE layer is one) measured as the dense layers are: its attention and norms as
    a dense layer's, the router's fp32 softmax and top-k, and per routed copy (k per token) the tensors
    moe_bytes names; under transformers' default grouped_mm (what training runs) and the eager per-expert loop."""
    shapes, b, T = estimate.tiny("qwen3_vl_moe"), dtype.itemsize, 128
    assert shapes.text.sparse_layers == shapes.text.layers
    layer = (_decoder_saved("qwen3_vl_moe", 4, T, dtype, experts)
             - _decoder_saved("qwen3_vl_moe", 2, T, dtype, experts)) / 2 / T
    want = estimate.layer_bytes(shapes.text, b, 1, 0, sparse=True)[0]
    if experts == "eager":
        want += estimate.moe_bytes(shapes.text, b, eager=True)[0] - estimate.moe_bytes(shapes.text, b)[0]
    assert layer == pytest.approx(want, rel=0.01)


S3 = estimate.Plan(estimate.PRESETS["qwen3_vl_8b"], seq_len=262144, world=32, sp_size=8, zero_stage=3)


def test_activations_scale_with_sp_and_move_to_host_with_offload():
    one, two = (estimate.estimate(replace(S3, sp_size=n)) for n in (1, 2))
    for part in ("decoder activations", "ViT activations", "merger activations"):
        assert one.part(part).device == 2 * two.part(part).device, part
    rep = estimate.estimate(replace(S3, sp_size=2, sp_vision="replicate"))
    assert rep.part("ViT activations").device == one.part("ViT activations").device  # every rank encodes all
    assert rep.part("decoder activations").device == two.part("decoder activations").device
    off = estimate.estimate(replace(S3, offload_activations=True))
    stored = estimate.estimate(S3).part("decoder activations")
    assert off.part("decoder activations").device == 0 and off.part("decoder activations").host == stored.device
    assert off.device_gib < estimate.estimate(S3).device_gib and off.host_gib > 0
    nockpt = estimate.estimate(replace(S3, checkpointing=False))
    T = S3.shapes.text
    assert nockpt.part("decoder activations").device == pytest.approx(
        T.layers * 262144 / 8 * estimate.layer_bytes(T, 2, 8, 0)[0])
    tiled = estimate.layer_bytes(T, 2, 8, 4)[0]
    assert estimate.layer_bytes(T, 2, 8, 0)[0] - tiled == pytest.approx(2 * 4 * T.intermediate * 3 / 4)


def test_model_state_partitioning():
    counts = S3.shapes.params()
    total = sum(counts.values())
    z3 = estimate.estimate(S3)
    assert z3.part("parameters").device == total * 2 / 32
    assert z3.part("optimizer states").device == total * 12 / 32
    z2 = estimate.estimate(replace(S3, zero_stage=2, trainable=("merger", "llm")))
    assert z2.part("parameters").device == total * 2  # ZeRO-2 keeps full parameters
    assert z2.part("optimizer states").device == (counts["merger"] + counts["llm"]) * 12 / 32
    off = estimate.estimate(replace(S3, offload_optimizer=True))
    assert off.part("optimizer states").device == 0 and off.part("optimizer states").host == total * 12 / 32


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.memory", "estimate", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_a_verdict(tmp_path):
    r = _cli("--model", "qwen3_vl_8b", "--seq-len", "262144", "--sp", "8", "--zero", "3", "--checkpointing",
             "--world", "32", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    for want in ("component", "parameters", "decoder activations", "Ulysses buffers", "ViT activations", "loss",
                 "allowance", "total (peak)", "fits in 80 GiB: yes"):
        assert want in r.stdout, want
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["device_gib"] < 80 and {p["name"] for p in data["parts"]} >= {"parameters", "loss"}
    big = _cli("--model", "qwen3_vl_8b", "--seq-len", "262144", "--checkpointing", "--world", "32")
    assert big.returncode == 0, big.stderr
    assert "fits in 80 GiB: no" in big.stdout and "levers that make it fit: parallel.sp_size=" in big.stdout


def test_levers_name_changes_that_really_fit():
    big = replace(S3, sp_size=1, checkpointing=False)
    assert not estimate.fits(big, 80)[0]
    found = estimate.levers(big, 80)
    assert found
    for change in found:
        assert estimate.fits(replace(big, **change), 80)[0], change
    assert "model.gradient_checkpointing=true" in estimate.overrides(found[0])  # the cheapest lever first
    parked = replace(big, offload_activations=True, tiled_mlp=2)  # fits the device only by parking TiBs on the host
    assert estimate.estimate(parked).device_gib < 80 < estimate.HOST_GIB < estimate.estimate(parked).host_gib
    assert not estimate.fits(parked, 80)[0]
    sapo = replace(S3, sp_size=1, sp_allowed=False, world=64)  # an objective that refuses SP gets no sp lever
    assert all("sp_size" not in c for c in estimate.levers(sapo, 80))
    assert estimate.levers(S3, 80) == []  # it fits already


def _recipe(tmp_path, name, *extra):
    cfg = compose("launch", [f"pipeline={name}", f"output_dir={tmp_path / 'out'}", "launcher=slurm",
                             "launcher.nproc_per_node=8", "launcher.gpus_per_node=8", *extra])
    p = pipeline_config(cfg.pipeline)
    return p, plan(p, Path(cfg.output_dir)), lambda step: step_world(cfg.launcher, step)


def test_every_real_recipe_step_passes_the_guard(tmp_path):
    """8 GPUs per node as the recipes' comments count them; qwen3vl from its `shapes` preset (init_path does not
    exist), qwen2_5vl from init_path's config.json."""
    init, teacher, moe_teacher = tmp_path / "init", tmp_path / "teacher", tmp_path / "moe_teacher"
    for d, key in ((init, "qwen2_5_vl_7b"), (teacher, "qwen3_vl_32b"), (moe_teacher, "qwen3_vl_235b_a22b")):
        family, text, vision = HF[key]
        FAMILIES[family].config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False).save_pretrained(d)
    recipes = {"qwen3vl": (["pipeline.init_path=/ckpt/missing", f"pipeline.teacher={teacher}"], "qwen3_vl_8b"),
               "qwen2_5vl": ([f"pipeline.init_path={init}"], "qwen2_5_vl_7b"),
               # Qwen3-VL-30B-A3B distilled from Qwen3-VL-235B-A22B
               "qwen3vl_moe": (["pipeline.init_path=/ckpt/missing", f"pipeline.teacher={moe_teacher}"],
                               "qwen3_vl_30b_a3b")}
    for name, (extra, preset) in recipes.items():
        p, steps, world = _recipe(tmp_path, name, *extra)
        shapes = recipe_shapes(p)
        assert shapes == estimate.PRESETS[preset]
        assert check_steps(steps, world, p.device_gib, shapes) is None
        assert all(s.memory_gib is not None and s.memory_gib <= p.device_gib for s in steps), name
        sp = {s.name: next((a for a in s.args if a.startswith("parallel.sp_size=")), None) for s in steps}
        if name == "qwen3vl_moe":  # the qwen3vl chain, every step estimated with the MoE model's experts
            dense = _recipe(tmp_path, "qwen3vl", *recipes["qwen3vl"][0])[1]
            assert [(s.name, s.cfg.stage) for s in steps] == [(s.name, s.cfg.stage) for s in dense]
            assert sp["s3_long_256k"] == "parallel.sp_size=8" and sp["sft_long"] == "parallel.sp_size=8"
            mem = {s.name: s.memory_gib for s in steps}
            assert mem["distill_off"] > mem["sft"] + 6, mem  # the 235B teacher's shard (~6.9 GiB) on top of SFT's
        if name == "qwen3vl":
            assert sp["s3_long_256k"] == "parallel.sp_size=8" and sp["sft_long"] == "parallel.sp_size=8"
            mem = {s.name: s.memory_gib for s in steps}  # the 32B teacher on top of SFT's footprint at the same length
            assert mem["distill_off"] > mem["sft"], mem
            p8, steps8, _ = _recipe(tmp_path, name, extra[0], "pipeline.teacher=/ckpt/missing", "pipeline.only=[distill_off]")
            check_steps(steps8, world, p8.device_gib, recipe_shapes(p8))  # no config.json: the student's own shapes
            assert mem["distill_off"] > next(s.memory_gib for s in steps8 if s.selected), "the 32B teacher was not read"


def test_a_recipe_distill_step_without_a_teacher_is_refused_naming_the_key(tmp_path):
    p, steps, world = _recipe(tmp_path, "qwen3vl", "pipeline.init_path=/ckpt/missing", "pipeline.only=[distill_off]")
    with pytest.raises(ValueError) as err:
        check_steps(steps, world, p.device_gib, recipe_shapes(p))
    assert "step distill_off" in str(err.value) and "pipeline.teacher" in str(err.value), err.value


def test_a_step_that_cannot_fit_is_refused_with_the_levers(tmp_path):
    p, steps, world = _recipe(tmp_path, "qwen3vl", "pipeline.init_path=/ckpt/missing", "pipeline.only=[s3_long_256k]",
                              "pipeline.steps.s3_long_256k.overrides=['parallel.sp_size=1']")
    with pytest.raises(ValueError) as err:
        check_steps(steps, world, p.device_gib, recipe_shapes(p))
    msg = str(err.value)
    for want in ("step s3_long_256k", "GiB per rank", "pipeline.device_gib=80", "parallel.sp_size="):
        assert want in msg, msg


def test_the_tiny_pipeline_passes_trivially(tmp_path):
    cfg = compose("launch", [f"output_dir={tmp_path}"])
    p = pipeline_config(cfg.pipeline)
    steps = plan(p, tmp_path)
    assert check_steps(steps, lambda step: 1, p.device_gib, recipe_shapes(p)) is None
    assert all(s.memory_gib < 3 for s in steps)  # the allowance and little else


# ---------------------------------------------------------------- engine=megatron

def _lm_state_on_meta(family: str, tied: bool):
    """The tiny HF model's decoder and lm_head weights (on the meta device: shapes only) and its text config."""
    fam, shapes = FAMILIES[family], estimate.tiny(family)
    cfg = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=shapes.text.vocab),
                         vision_config=dict(fam.tiny_vision), tie_word_embeddings=tied)
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    return state, cfg.get_text_config(), replace(shapes, text=replace(shapes.text, tied=tied))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("tied", [False, True])
def test_megatron_parameters_per_rank_equal_convert_shards(family, tied):
    """The estimator's decoder parameters on one rank equal the numel of training/mcore/convert.py's shards of
    the tiny model (what the engine loads): TP ranks 0 and 1 of tp=2, both stages of pp=2 (the embedding on the
    first, the final norm and head, or a tied head's copy, on the last), tp2 x pp2, a MoE model's experts split
    over ep=2; the vocabulary padded to 128 x tp rows."""
    from training.mcore.convert import hf_to_mcore, padded_vocab_size

    state, text, shapes = _lm_state_on_meta(family, tied)
    moe = bool(shapes.text.experts)
    layouts = [(1, 1, 1), (2, 1, 1)] + ([(1, 1, 2)] if moe else [(1, 2, 1), (2, 2, 1)])
    for tp, pp, ep in layouts:
        for rank in range(tp):
            for stage in range(pp):
                shard = hf_to_mcore(state, text, tp, rank, tied, pp, stage, ep=ep, ep_rank=0)
                counts = estimate.mcore_params(shapes, tp, pp, ep, stage)
                assert sum(v.numel() for v in shard.values()) == sum(n for g, n in counts.items()
                                                                     if g not in ("vision", "merger")), (tp, pp, ep)
    assert estimate.vocab_rows(shapes.text.vocab, 2) * 2 == padded_vocab_size(shapes.text.vocab, 2)


@pytest.fixture(scope="module")
def megatron_state():
    """megatron's parallel state at tp=1 on a one-process gloo group (training/mcore/shim.py, CPU only)."""
    from training.mcore import shim

    if torch.cuda.is_available():
        pytest.skip("the megatron Decoder runs on CPU through training/mcore/shim.py only")
    created = shim.init_model_parallel(1)
    yield
    shim.destroy(created)


def _mcore_saved(family: str, layers: int, T: int, dtype, segments: int = 1, rows: int = 0,
                 recompute: bool = False) -> int:
    """Bytes autograd keeps for one forward of the tiny megatron Decoder: a packed row of T tokens in `segments`
    equal segments (cu_seqlens), or with `rows` padded rows of T positions each (attention_mask, the last half of
    the first row padding) under SDPA's math kernel, what CUDA runs for that masked GQA call; `recompute`:
    model.gradient_checkpointing (Decoder.recompute)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from training.mcore.model import Decoder, transformer_config

    fam = FAMILIES[family]
    text = fam.config_cls(text_config=dict(fam.tiny_text, vocab_size=64, num_hidden_layers=layers),
                          vision_config=dict(fam.tiny_vision)).get_text_config()
    dec = Decoder(text, transformer_config(text, 1, dtype, perform_initialization=True)).train()
    dec.recompute = recompute
    B = rows or 1
    x = torch.randn(B, T, text.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(T).view(1, 1, T).expand(3, B, T)
    if not rows:
        cu = torch.arange(0, T + 1, T // segments, dtype=torch.int32)
        return _saved_bytes(lambda: dec(x, pos, cu_seqlens=cu), dec.parameters())
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T // 2:] = 0

    def run():
        with sdpa_kernel(SDPBackend.MATH):
            dec(x, pos, attention_mask=mask)
    return _saved_bytes(run, dec.parameters())


def _mcore_layer(family: str, T: int, dtype, **kw) -> float:
    """Bytes one layer keeps per token: 4 layers minus 2 (what is outside the layers cancels), / 2 / tokens."""
    return (_mcore_saved(family, 4, T, dtype, **kw) - _mcore_saved(family, 2, T, dtype, **kw)) / 2 / (
        T * (kw.get("rows") or 1))


@pytest.mark.parametrize("family,dtype", [("qwen3_vl", torch.bfloat16), ("qwen2_5_vl", torch.float32),
                                          ("qwen3_vl_moe", torch.bfloat16)])
def test_megatron_layer_formula_equals_what_autograd_keeps(megatron_state, family, dtype):
    """engine=megatron's decoder layer (megatron-core's local spec with SegmentAttention) measured as the HF layers
    are. Packed rows: one segment of 128 tokens, and 256 tokens in 16 segments of 16 (one length class of
    sdpa_varlen): the same bytes per token, the formula's, with no term growing with the segments' length. On CPU
    torch's SDPA takes its flash kernel for these per-segment causal batches (grouped query heads included), which
    keeps q, k, v, the output and the log-sum-exp, what CUDA's flash (or cuDNN) kernel keeps on a GPU; were a
    softmax kept (SDPA's math kernel: heads x segment length x 4 B per token) the 256-token row of short segments
    would keep less per token than the 128-token segment, and the formula's exact figure would not match. Padded
    rows (RL rollouts: 2 rows of 64 positions with their mask), run under SDPA's math kernel since that is what a
    GPU runs for a masked call with grouped query heads (flash takes no mask, the memory-efficient kernel no GQA;
    CPU's flash kernel would take it): the fp32 q, k, v of the rank's heads and the fp32 softmax of 64 keys per
    head, `span=64`. CPU's composite RMSNorm keeps an fp32 copy of its input and the fp32 normalized tensor, which
    CUDA's fused kernel (the formula's) does not: added here."""
    shapes, b = estimate.tiny(family), dtype.itemsize
    t = shapes.text
    cpu_norms = 2 * (8 - b) * t.hidden + 4 * (t.heads + t.kv_heads) * t.head_dim * t.qk_norm
    rel = 0.005 if t.experts else 1e-9  # MoE: the routing varies with the data
    packed = estimate.mcore_layer_bytes(t, b, sparse=bool(t.experts))[0] + cpu_norms
    one, many = _mcore_layer(family, 128, dtype), _mcore_layer(family, 256, dtype, segments=16)
    assert one == pytest.approx(packed, rel=rel) and many == pytest.approx(packed, rel=rel), (one, many, packed)
    padded = _mcore_layer(family, 64, dtype, rows=2)
    assert padded == pytest.approx(estimate.mcore_layer_bytes(t, b, span=64, sparse=bool(t.experts))[0] + cpu_norms,
                                   rel=rel)
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim  # the attention's part, packed and padded
    assert estimate.mcore_layer_bytes(t, b, span=64)[0] - estimate.mcore_layer_bytes(t, b)[0] == \
        12 * q + 4 * t.heads * 64 + b * q - b * (3 * q + 2 * kv) - 4 * t.heads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_megatron_recompute_keeps_the_layer_inputs(megatron_state, dtype):
    """model.gradient_checkpointing on engine=megatron (Decoder.recompute: torch.utils.checkpoint per layer): a
    layer keeps its input alone, hidden x b per token (measured); the estimate then stores layers x tokens x hidden x
    b per forward pass in flight (/ tp under sequence parallelism: the layer input is the rank's slice) and
    recomputes one layer in backward, its figure plus its gradients; rollout rows add their mask."""
    t, b = estimate.tiny("qwen3_vl").text, dtype.itemsize
    assert _mcore_layer("qwen3_vl", 128, dtype, segments=4, recompute=True) == t.hidden * b
    T = M7.shapes.text
    plan = replace(M7, world=16, tp=2, grad_accum=2)
    ckpt, sp = estimate.estimate(plan), estimate.estimate(replace(plan, sequence_parallel=True))
    assert ckpt.part("decoder activations").device == T.layers * 8192 * T.hidden * 2
    assert sp.part("decoder activations").device == T.layers * 8192 * T.hidden * 2 / 2
    saved, grads = estimate.mcore_layer_bytes(T, 2, 2)
    assert ckpt.part("decoder layer in backward").device == 8192 * (saved + grads)
    full = estimate.estimate(replace(plan, checkpointing=False))
    stored = full.part("decoder activations").device
    assert stored == T.layers * 8192 * saved > 10 * ckpt.part("decoder activations").device
    assert full.part("decoder layer in backward").device == 8192 * grads
    pp = estimate.estimate(replace(plan, tp=1, pp=2, grad_accum=4, sequence_parallel=False, stage=0))
    assert pp.part("decoder activations").device == 2 * T.layers // 2 * 8192 * T.hidden * 2  # 2 passes in flight
    assert all(p.name != "attention masks" for p in ckpt.parts)  # packed rows: no mask
    rl = estimate.estimate(replace(plan, rollouts=4, max_new_tokens=1024, seq_len=1024, pp_allowed=False))
    span = estimate.PROMPT_LEN + 1024
    assert rl.part("attention masks").device == rl.plan.tokens * span
    saved, grads = estimate.mcore_layer_bytes(T, 2, 2, span=span)
    assert rl.part("decoder layer in backward").device == rl.plan.tokens * (saved + grads)


M7 = estimate.Plan(estimate.PRESETS["qwen2_5_vl_7b"], seq_len=8192, world=8, zero_stage=0, engine="megatron",
                   distributed_optimizer=False, checkpointing=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_megatron_at_tp1_pp1_is_the_unpartitioned_estimate(dtype):
    """At tp = pp = 1 without the distributed optimizer engine=megatron holds what DeepSpeed's ZeRO-0 holds, part by
    part, except: gradients are fp32 buffers (4 B, ZeRO-0 counts the dtype's) and the recomputed layer is
    megatron's (its figure: fused RMSNorm, no fp32 upcasts); with checkpointing both store the layer inputs alone,
    without it megatron every layer's figure. 152064 is a multiple of 128: no vocabulary padding. The distributed
    optimizer then shards the optimizer states as ZeRO-1 does, less ZeRO-1's fp32 copy of fp32 parameters (megatron
    updates their shards in place: 8 B, not 12)."""
    mc = estimate.estimate(replace(M7, dtype=dtype))
    ds = estimate.estimate(replace(M7, dtype=dtype, engine="deepspeed"))
    b = 2 if dtype == "bf16" else 4
    for part in ("parameters", "optimizer states", "ViT activations", "merger activations", "pixel values",
                 "ViT block in backward", "visual features", "loss", "decoder activations"):
        assert mc.part(part).device == ds.part(part).device, part
    assert mc.part("gradients").device == ds.part("gradients").device * 4 / b
    T = M7.shapes.text
    assert mc.part("decoder layer in backward").device == 8192 * sum(estimate.mcore_layer_bytes(T, b))
    full = estimate.estimate(replace(M7, dtype=dtype, checkpointing=False))
    assert full.part("decoder activations").device == T.layers * 8192 * estimate.mcore_layer_bytes(T, b)[0]
    z1 = estimate.estimate(replace(M7, dtype=dtype, engine="deepspeed", zero_stage=1))
    dist = estimate.estimate(replace(M7, dtype=dtype, distributed_optimizer=True))
    assert dist.part("optimizer states").device == z1.part("optimizer states").device * (1 if b == 2 else 8 / 12)


def test_megatron_model_state_scales_with_tp_pp_and_the_distributed_optimizer():
    """The decoder's matrices and vocabulary shards scale as 1/tp, the ViT (replicated) does not; pp=2 halves the
    layers per rank, the first stage holds the embedding and the ViT's activations, the last the head and the loss;
    the distributed optimizer divides the optimizer state by dp = world / (tp x pp); sequence parallelism divides
    the norms' part of a layer (all outside the TP regions) by tp when every layer is stored; the estimate is the
    larger stage."""
    s = M7.shapes
    T, counts = s.text, s.params()
    one, four = estimate.mcore_params(s), estimate.mcore_params(s, tp=4)
    assert four["vision"] == one["vision"] and four["merger"] == one["merger"]
    norms = T.layers * (2 * T.hidden) + T.hidden  # replicated over TP
    assert four["llm"] - norms == (one["llm"] - norms) / 4 == (counts["llm"] - norms) / 4
    first, last = (estimate.mcore_params(s, pp=2, stage=st)["llm"] for st in (0, 1))
    rows = T.vocab * T.hidden
    assert first - rows == (last - rows - T.hidden) == (counts["llm"] - 2 * rows - T.hidden) / 2
    plan = replace(M7, world=16, tp=2, pp=2, grad_accum=4, dtype="bf16")
    stages = [estimate.estimate(replace(plan, stage=st)) for st in (0, 1)]
    for est, st in zip(stages, (0, 1)):
        n = sum(estimate.mcore_params(s, 2, 2, 1, st).values())
        assert est.part("parameters").device == n * 2 and est.part("gradients").device == n * 4
        assert est.part("optimizer states").device == n * 12  # every parameter trained, not sharded
    names = [{p.name for p in e.parts} for e in stages]
    assert "ViT activations" in names[0] - names[1] and "loss" in names[1] - names[0]
    assert stages[0].part("decoder activations").device == 2 * stages[1].part("decoder activations").device  # 2 vs 1
    worst = estimate.estimate(plan)
    assert worst.device_gib == max(e.device_gib for e in stages) and worst.plan == plan
    dist = estimate.estimate(replace(plan, distributed_optimizer=True, stage=0))
    assert dist.part("optimizer states").device == stages[0].part("optimizer states").device / 4  # dp = 16 / 4
    h, sp = T.hidden, estimate.mcore_layer_bytes(T, 2, 4, True)[0]
    assert estimate.mcore_layer_bytes(T, 2, 4, False)[0] - sp == 2 * (2 * 2 * h + 4) * (1 - 1 / 4)
    # megatron's 1F1B: warm-up + 1 passes in flight, at most the micro-batches; interleaved holds more
    assert [estimate.in_flight(4, 1, 8, st) for st in range(4)] == [4, 3, 2, 1]
    assert estimate.in_flight(4, 1, 2) == 2 and estimate.in_flight(2, 2, 4) == 5  # vpp 2: 5 chunks of L/4 > L/2 x 2


def test_megatron_72b_s1_step():
    """Qwen2.5-VL-72B, an S1 step (8192-token rows, ViT + LLM trained, bf16, 2 micro-batches). On 8 GPUs nothing
    fits: 73B parameters x 16-18 B of model state over 8 ranks is > 80 GiB before any activation, and megatron's
    (tp 8, dp 1: fp32 gradients, the ViT on every rank, no optimizer sharding) is larger than ZeRO-3's. The guard's
    old bound (megatron counted unpartitioned) was ~7x that. On 64 ranks megatron's model state fits (~68 GiB at
    tp 8 or tp 4 x pp 2, ~44 at tp 8 x pp 2) and, its attention keeping no scores, the activations decide:
    checkpointed (80 layer inputs of 8192 x 8192 x 2 B = 10 GiB, / 8 under sequence parallelism) tp 8 fits with
    sequence parallelism (~79 GiB) and not without (~88), tp 4 x pp 2 does not (~90), tp 8 x pp 2 + SP does (~54),
    as ZeRO-3 does (~43); without checkpointing no layout fits (tp 8 + SP: 32 GiB of stored layers, ~143)."""
    s = estimate.PRESETS["qwen2_5_vl_72b"]
    s1 = estimate.Plan(s, seq_len=8192, world=8, dtype="bf16", checkpointing=True, grad_accum=2)
    state = ("parameters", "gradients", "optimizer states", "ZeRO-3 working set")

    def model_state(p):
        est = estimate.estimate(p)
        return sum(x.device for x in est.parts if x.name in state) / estimate.GiB

    z3 = replace(s1, zero_stage=3)
    tp8, tp4pp2 = replace(s1, engine="megatron", tp=8), replace(s1, engine="megatron", tp=4, pp=2)
    assert 80 < model_state(z3) < model_state(tp8) == pytest.approx(model_state(tp4pp2), rel=0.05)
    assert model_state(replace(s1, zero_stage=0)) > 6 * model_state(tp8)  # the old engine=megatron bound
    assert not any(estimate.fits(p, 80)[0] for p in (z3, tp8, tp4pp2, replace(tp8, sequence_parallel=True)))
    z3, tp8, tp4pp2 = (replace(p, world=64) for p in (z3, tp8, tp4pp2))
    tp8sp, tp8pp2sp = replace(tp8, sequence_parallel=True), replace(tp8, pp=2, sequence_parallel=True)
    assert all(model_state(p) < 70 for p in (tp8, tp4pp2, tp8pp2sp)) and model_state(tp8pp2sp) < 45
    gib = {name: estimate.estimate(p).device_gib for name, p in
           (("z3", z3), ("tp8", tp8), ("tp8sp", tp8sp), ("tp4pp2", tp4pp2), ("tp8pp2sp", tp8pp2sp))}
    assert gib["z3"] < gib["tp8pp2sp"] < gib["tp8sp"] < 80 < gib["tp8"] < gib["tp4pp2"], gib
    stored = estimate.estimate(tp8).part("decoder activations").device
    assert stored == 80 * 8192 * 8192 * 2 == 8 * estimate.estimate(tp8sp).part("decoder activations").device
    for p in (z3, tp8, tp8sp, tp4pp2, tp8pp2sp):  # every layer stored: none fits
        assert not estimate.fits(replace(p, checkpointing=False), 80)[0], p
    full = estimate.estimate(replace(tp8sp, checkpointing=False))
    assert full.part("decoder activations").device / estimate.GiB == pytest.approx(
        80 * 8192 * estimate.mcore_layer_bytes(s.text, 2, 8, True)[0] / estimate.GiB)
    assert estimate.levers(replace(tp8sp, checkpointing=False), 80)[0] == {"checkpointing": True}
    pp4 = replace(tp8sp, pp=4)  # the first stage the larger (the ViT, 4 passes in flight); at 1024 tokens the last
    assert estimate.fits(pp4, 80)[0] and estimate.estimate(pp4).stage == 0
    assert estimate.estimate(replace(pp4, seq_len=1024)).stage == 3  # (the loss's chunk and head gradient)


def test_megatron_from_job_levers_and_cli(tmp_path):
    """from_job fills the layout from engine=megatron's config; the levers of a megatron plan are its own (tp, pp,
    sequence parallelism, ...; never ZeRO or Ulysses SP) and really fit; the CLI prints the layout."""
    from conftest import compose
    from training.train import to_job

    job = to_job(compose(["engine=megatron", "engine.tp=2", "engine.pp=2", "engine.sequence_parallel=true",
                          "engine.dtype=bf16"]))
    plan = estimate.from_job(job, 8)
    assert (plan.engine, plan.tp, plan.pp, plan.vpp, plan.ep, plan.sequence_parallel, plan.distributed_optimizer,
            plan.pp_allowed, plan.dp) == ("megatron", 2, 2, 1, 1, True, True, True, 2)
    old = estimate.estimate(replace(plan, engine="deepspeed", zero_stage=0))  # the former bound
    assert estimate.estimate(plan).part("parameters").device < old.part("parameters").device
    sapo = estimate.from_job(to_job(compose(["engine=megatron", "stage=sapo"])), 8)
    assert sapo.pp_allowed and sapo.rollouts  # every objective runs on a pipeline now
    big = estimate.Plan(estimate.PRESETS["qwen2_5_vl_72b"], seq_len=1024, world=64, dtype="bf16", grad_accum=2,
                        engine="megatron", tp=2)
    found = estimate.levers(big, 80)
    assert found and all(set(c) <= {"checkpointing", "distributed_optimizer", "sequence_parallel", "tp", "pp", "ep",
                                    "micro_batch_size", "offload_activations"} for c in found)
    for change in found:
        assert estimate.fits(replace(big, **change), 80)[0], change
    assert any(o.startswith(("engine.tp=", "engine.pp=")) for o in estimate.overrides(found[0]))
    r = _cli("--model", "qwen2_5_vl_72b", "--seq-len", "1024", "--world", "64", "--grad-accum", "2", "--engine",
             "megatron", "--tp", "8", "--pp", "4", "--sequence-parallel", "--checkpointing")
    assert r.returncode == 0, r.stderr
    for want in ("megatron tp 8 x pp 4 x dp 2", "sequence parallel", "checkpointed layer inputs", "pipeline buffers",
                 "fp32 buffers", "fits in 80 GiB: yes"):
        assert want in r.stdout, want
