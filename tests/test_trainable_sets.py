"""For every stage x tiny family: after real optimizer steps through DeepSpeed, exactly the parameters of the
stage's trainable groups changed and every other parameter is bit-identical (compared on the HF exports,
loaded back with from_pretrained)."""
import pytest
import torch

from conftest import compose, load_hf, run_stage
from training.models import FAMILIES, build, param_groups
from training.train import to_job

STAGES = ["vit_align", "s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "dpo", "sapo"]


def _group_of_each_parameter(family: str) -> dict[str, str]:
    b = build(to_job(compose([f"model=tiny_{family}"])).model)
    groups = param_groups(b.model, b.family)
    return {n: g for g, names in groups.items() for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stage", STAGES)
def test_only_the_stage_groups_change(stage, family, tmp_path, initial_exports):
    before = initial_exports(f"tiny_{family}")
    # dpo/sapo objectives land later; their trainable set and optimizer are exercised with the lm loss
    extra = ["stage.objective.name=lm"] if stage in ("dpo", "sapo") else []
    run_stage(tmp_path, [f"stage={stage}", f"model=tiny_{family}", "trainer.max_steps=2",
                         "trainer.save_every=0", *extra])
    after = load_hf(tmp_path / "hf")
    assert after.keys() == before.keys()
    trainable = set(to_job(compose([f"stage={stage}"])).stage.trainable)
    owner = _group_of_each_parameter(family)
    assert set(owner) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if owner[k] in trainable}
    assert changed == expected, (f"unexpected changes: {sorted(changed - expected)[:5]}; "
                                 f"unchanged trainables: {sorted(expected - changed)[:5]}")
