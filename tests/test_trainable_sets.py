"""For every stage x tiny family: after real optimizer steps through DeepSpeed, exactly the parameters of the
stage's trainable groups changed and every other parameter is bit-identical (compared on the HF exports,
loaded back with from_pretrained). The MoE family's stage runs (and its router / experts groups) are in
tests/test_moe.py."""
import pytest
import torch

from conftest import compose, load_hf, run_stage
from training.models import FAMILIES, build, leaf_groups, param_groups
from training.train import to_job

STAGES = ["vit_align", "s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "dpo", "sapo"]


def _group_of_each_parameter(family: str) -> dict[str, str]:
    b = build(to_job(compose([f"model=tiny_{family}"])).model)
    groups = param_groups(b.model, b.family)
    return {n: g for g, names in groups.items() for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if not FAMILIES[f].moe))
@pytest.mark.parametrize("stage", STAGES)
def test_only_the_stage_groups_change(stage, family, tmp_path, initial_exports):
    before = initial_exports(f"tiny_{family}")
    overrides = [f"stage={stage}", f"model=tiny_{family}", "trainer.max_steps=2", "trainer.save_every=0"]
    if stage == "dpo":  # the real DPO loss on preference pairs
        run_stage(tmp_path, overrides + ["stage.mixture={preference: 1}"])
    elif stage == "sapo":
        # a random tiny model earns the same (zero) reward on every rollout, so RL drops every group and
        # nothing would change; the stage's trainable set and optimizer are exercised with the lm loss
        from omegaconf import open_dict

        from conftest import SHORT_ROWS
        from training.train import run_config

        cfg = compose(["logger=none", f"output_dir={tmp_path}", SHORT_ROWS, *overrides])
        with open_dict(cfg):
            cfg.stage.objective = {"name": "lm"}
        run_config(cfg)
    else:
        run_stage(tmp_path, overrides)
    after = load_hf(tmp_path / "hf")
    assert after.keys() == before.keys()
    trainable = set(leaf_groups(to_job(compose([f"stage={stage}"])).stage.trainable, FAMILIES[family].leaf_groups))
    owner = _group_of_each_parameter(family)
    assert set(owner) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if owner[k] in trainable}
    assert changed == expected, (f"unexpected changes: {sorted(changed - expected)[:5]}; "
                                 f"unchanged trainables: {sorted(expected - changed)[:5]}")
