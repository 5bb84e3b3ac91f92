"""Model family: tiny presets, tokenizer asset, parameter groups, loading real HF directories."""
import json

import pytest
import torch

from training import models
from training.models import FAMILIES, ModelConfig, build, param_groups

QWEN3 = ("qwen3_vl", "qwen3_vl_moe")  # Qwen3-VL's ViT (DeepStack), processor and chat template
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
           "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    return build(ModelConfig(name=f"tiny_{request.param}", family=request.param))


def test_groups_cover_every_parameter_exactly_once(bundle):
    groups = param_groups(bundle.model, bundle.family)
    names = [n for n, _ in bundle.model.named_parameters()]
    flat = [n for g in groups.values() for n in g]
    assert sorted(flat) == sorted(names)  # none in two groups, none in no group
    assert list(groups) == list(bundle.family.leaf_groups) and all(groups.values())
    assert models.leaf_groups(models.GROUPS, groups) == list(groups)  # vision, merger, llm name every leaf


def test_groups_hold_the_right_modules(bundle):
    groups = param_groups(bundle.model, bundle.family)
    assert any("patch_embed" in n for n in groups["vision"])
    assert any(".blocks.0." in n for n in groups["vision"])
    assert not any("merger" in n for n in groups["vision"])
    assert all(n.startswith("model.visual.") and "merger" in n for n in groups["merger"])
    llm = [n for g in models.leaf_groups(["llm"], groups) for n in groups[g]]  # MoE: dense + router + experts
    assert "lm_head.weight" in llm
    assert any("embed_tokens" in n for n in llm)
    assert any(n.startswith("model.language_model.norm.") for n in llm)
    assert sorted(llm) == sorted(n for n, _ in bundle.model.named_parameters()
                                 if n.startswith(("model.language_model.", "lm_head.")))
    if bundle.family.name in QWEN3:
        n_deep = len(bundle.model.config.vision_config.deepstack_visual_indexes)
        for k in range(n_deep):  # every DeepStack merger is in the merger group (a peer's freezing bug)
            assert any(n.startswith(f"model.visual.deepstack_merger_list.{k}.") for n in groups["merger"])


def test_tiny_presets_are_small_and_keep_each_familys_features(bundle):
    n = sum(p.numel() for p in bundle.model.parameters())
    assert 1_000_000 < n < 10_000_000
    vc = bundle.model.config.vision_config
    if bundle.family.name in QWEN3:
        assert len(vc.deepstack_visual_indexes) == 3 and vc.patch_size == 16
    if bundle.family.name == "qwen2_5_vl":
        assert vc.fullatt_block_indexes and len(vc.fullatt_block_indexes) < vc.depth  # window + full blocks
    if bundle.family.name in ("qwen2_vl", "qwen2_5_vl"):
        assert vc.patch_size == 14
    ip = bundle.image_processor
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (bundle.family.patch_size, 2, 2)


def test_tiny_init_is_seeded(bundle):
    again = build(ModelConfig(name="x", family=bundle.family.name))
    other = build(ModelConfig(name="x", family=bundle.family.name, init_seed=1))
    a, b, c = (m.model.state_dict() for m in (bundle, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tokenizer_carries_qwen_special_tokens_and_chat_template(bundle):
    tok = bundle.tokenizer
    for t in SPECIAL:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    cfg = bundle.model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>\n")
    # Qwen2/2.5-VL templates add the default system prompt; Qwen3-VL's does not
    assert ("You are a helpful assistant." in text) == (bundle.family.name not in QWEN3)


def test_real_checkpoint_directory_loads_weights_tokenizer_and_processor(bundle, tmp_path):
    sd = bundle.model.state_dict()
    models.export_hf(bundle, sd, tmp_path)
    real = build(ModelConfig(name=bundle.family.name, family=bundle.family.name, path=str(tmp_path)))
    assert type(real.model) is type(bundle.model)
    assert all(torch.equal(v, sd[k]) for k, v in real.model.state_dict().items())
    assert real.tokenizer.chat_template == bundle.tokenizer.chat_template
    assert real.image_processor.patch_size == bundle.image_processor.patch_size


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        build(ModelConfig(name="qwen2_vl", family="qwen2_vl", path=str(tmp_path / "nope")))


def test_mismatched_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(ValueError, match="holds a 'qwen3_vl' checkpoint.*use model=qwen3_vl"):
        build(ModelConfig(name="qwen2_vl", family="qwen2_vl", path=str(tmp_path)))


def test_unknown_group_in_stage_is_a_clear_error(bundle):
    groups = param_groups(bundle.model, bundle.family)
    with pytest.raises(ValueError, match="unknown group.*projector"):
        models.apply_trainable(bundle.model, groups, ["projector"])
