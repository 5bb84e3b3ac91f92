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
