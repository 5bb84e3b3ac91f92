"""LoRA through peft (training/lora.py, stage.lora): which parameters train, the merged export, the adapter-off
reference, and whole stages (SFT on one process, DPO on 2 ranks under ZeRO-3 with the implicit reference)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHORT_ROWS, clean_env, load_hf, metrics_rows
from data.encode import IGNORE
from test_packing import image_sample, text_sample
from training import lora, models
from training.models import ModelConfig, build
from training.vlm import VLM


def _adapted(family="qwen3_vl", **kw):
    b = build(ModelConfig(name=f"tiny_{family}", family=family))
    base = {k: v.clone() for k, v in b.model.state_dict().items()}
    cfg = lora.LoraSettings(r=4, **kw)
    lora.inject(b.model, b.family, cfg)
    groups = models.param_groups(b.model, b.family)
    models.apply_trainable(b.model, groups, ["merger", "llm"])
    lora.train_adapters_only(b.model, groups, cfg)
    return b, cfg, groups, base


def _batch(b):
    from data.pack import PackConfig, collate

    samples = [image_sample(b, 0), text_sample(b, 1)]
    cfg = PackConfig(seq_len=sum(len(s["input_ids"]) for s in samples), buffer_size=4,
                     pad_id=b.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    return collate([r for s in samples for r in packer.add(s)] + packer.flush(), cfg)


def test_adapters_train_their_group_and_the_other_trainable_groups_train_fully():
    b, cfg, groups, _ = _adapted()
    trained = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert sum(map(len, groups.values())) == len(dict(b.model.named_parameters()))  # each in exactly one group
    assert trained >= set(groups["merger"])  # merger: fully trained, no adapters there
    llm = [n for n in trained if n in set(groups["llm"])]
    assert llm and all(".lora_" in n for n in llm)  # llm: the adapters only
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in llm} == set(cfg.targets)
    assert not any(".lora_" in n for n in groups["vision"] + groups["merger"])
    with pytest.raises(ValueError, match="a LoRA group must be one of stage.trainable"):
        lora.check(lora.LoraSettings(r=4, groups=["vision"]), ["merger", "llm"])
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.target_modules(b.model, b.family, lora.LoraSettings(r=4, targets=["nope"]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_merged_export_equals_the_adapted_model_and_adapter_off_is_the_start(tmp_path, family):
    b, cfg, _, base = _adapted(family)
    g = torch.Generator().manual_seed(0)
    for n, p in b.model.named_parameters():
        if ".lora_B." in n:  # B starts at zero; a trained adapter does not
            p.data = torch.randn(p.shape, generator=g) * 0.05
    batch = _batch(b)
    vlm = VLM(b.model)
    with torch.no_grad():
        adapted, _ = vlm(batch)
        off, _ = lora.AdapterOff(vlm)(batch)
    assert all(p.requires_grad for n, p in b.model.named_parameters() if ".lora_" in n)  # switched back on
    sd = {k: v.detach().clone() for k, v in b.model.state_dict().items()}
    merged, adapter = lora.merged_state_dict(b, sd, cfg)
    assert adapter and all(".lora_" in k for k in adapter) and not any("lora" in k or "base_layer" in k
                                                                        for k in merged)
    models.export_hf(b, merged, tmp_path / "hf")
    plain = b.family.model_cls.from_pretrained(str(tmp_path / "hf"))  # plain transformers, no peft
    start = build(ModelConfig(name=f"tiny_{family}", family=family)).model
    start.load_state_dict(base)
    with torch.no_grad():
        exported, _ = VLM(plain)(batch)
        started, _ = VLM(start)(batch)
    sup = batch["labels"][:, 1:] != IGNORE
    assert float((adapted - started)[sup].abs().max()) > 1e-3  # the adapter changes the model
    torch.testing.assert_close(exported, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, started, rtol=1e-6, atol=1e-6)


TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


def _train(out, *overrides, nproc=1):
    launcher = TORCHRUN2 if nproc == 2 else [sys.executable, "-m"]
    p = subprocess.run(launcher + ["training.train", SHORT_ROWS, "logger=none", "stage.lora.r=8",
                                   f"output_dir={out}", *overrides],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return metrics_rows(out)


def _changed(out, family):
    init = dict(build(ModelConfig(name=f"tiny_{family}", family=family)).model.named_parameters())
    w = load_hf(out / "hf")
    assert w.keys() == init.keys()  # merged: the plain model's names, nothing of peft's
    return {k for k in init if not torch.equal(w[k], init[k])}


@pytest.mark.slow
def test_lora_sft_lowers_the_loss_and_exports_merged_weights(tmp_path):
    rows = _train(tmp_path / "sft", "stage=sft", "model=tiny_qwen3_vl", "trainer.max_steps=8",
                  "stage.optimizer.lr=3e-3", "stage.lora.save_adapter=true")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    changed = _changed(tmp_path / "sft", "qwen3_vl")
    llm = {k for k in changed if k.startswith("model.language_model.")}
    assert llm and all(k.rsplit(".", 2)[-2] in lora.DEFAULT_TARGETS for k in llm)  # adapted layers only
    assert not any(".visual.blocks." in k for k in changed)  # the ViT stays frozen in SFT
    assert (tmp_path / "sft" / "hf" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_dpo_on_two_ranks_under_zero3_uses_the_adapter_off_reference(tmp_path):
    rows = _train(tmp_path / "dpo", "stage=dpo", "stage.mixture={preference: 1}", "model=tiny_qwen2_5_vl",
                  "engine=zero3", "trainer.max_steps=4", "stage.optimizer.lr=5e-3", "trainer.micro_batch_size=1",
                  nproc=2)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6  # adapters start at zero: policy == reference
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["rewards/margin"] != 0
    changed = _changed(tmp_path / "dpo", "qwen2_5_vl")
    assert changed and all(k.rsplit(".", 2)[-2] in lora.DEFAULT_TARGETS or ".visual.merger." in k for k in changed)
