"""Config tree: every group option composes, and bad keys or options fail with messages naming them."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from conftest import REPO, cli, compose
from stages import build_objective
from training.train import to_job

STAGES = ["vit_align", "s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "dpo", "sapo"]
TINY = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]


def test_conf_groups_have_exactly_the_documented_options():
    opts = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
            for g in ("model", "stage", "data", "engine", "logger")}
    assert opts["stage"] == sorted(STAGES)
    assert opts["model"] == sorted(TINY + ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    assert opts["engine"] == ["zero1", "zero2", "zero3"]
    assert opts["logger"] == ["none", "wandb"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model", TINY)
def test_every_stage_and_tiny_model_composes_into_typed_config(stage, model):
    job = to_job(compose([f"stage={stage}", f"model={model}"]))
    assert job.stage.name == stage and job.model.name == model
    assert set(job.stage.trainable) <= {"vision", "merger", "llm"}
    assert job.stage.loss_reduction in ("token", "sample", "sqrt")


def test_stage_trainable_sets_follow_the_papers():
    trainable = {s: set(to_job(compose([f"stage={s}"])).stage.trainable) for s in STAGES}
    assert trainable["vit_align"] == {"vision", "merger"}
    assert trainable["s0_merger"] == {"merger"}
    for s in ("s1_multimodal", "s2_long_32k", "s3_long_256k"):
        assert trainable[s] == {"vision", "merger", "llm"}
    for s in ("sft", "dpo", "sapo"):
        assert trainable[s] == {"merger", "llm"}
    seq = {s: to_job(compose([f"stage={s}"])).stage.seq_len for s in STAGES}
    assert (seq["s1_multimodal"], seq["s2_long_32k"], seq["s3_long_256k"]) == (8192, 32768, 262144)


def test_unknown_override_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose(["trainer.max_stepz=3"])


def test_unknown_group_option_fails_listing_the_options():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model=tiny_qwen4_vl"])
    assert "model/tiny_qwen4_vl" in str(e.value)


def test_typo_inside_a_group_file_fails_naming_key():
    # `+` adds the key the way a misspelt line in a stage YAML would; the dataclass schema rejects it
    with pytest.raises(ValueError, match="trainabel"):
        to_job(compose(["+stage.trainabel=[llm]"]))


def test_objective_keys_are_validated_by_the_objective():
    with pytest.raises(ValueError, match="betta"):
        build_objective({"name": "lm", "betta": 0.1}, "token")
    with pytest.raises(ValueError, match="unknown"):
        build_objective({"name": "ppo"}, "token")
    with pytest.raises(ValueError, match="loss_reduction"):
        build_objective({"name": "lm"}, "mean")


def test_cfg_job_prints_the_resolved_config():
    r = cli(["--cfg", "job", "stage=sft", "model=tiny_qwen2_5_vl", "output_dir=/x/y"])
    assert r.returncode == 0, r.stderr
    assert "name: sft" in r.stdout and "family: qwen2_5_vl" in r.stdout and "output_dir: /x/y" in r.stdout


@pytest.mark.parametrize("override, key", [("trainer.micro_batch_size=0", "micro_batch_size"),
                                           ("trainer.grad_accum=0", "grad_accum"),
                                           ("trainer.max_steps=-1", "max_steps")])
def test_impossible_trainer_settings_fail_before_any_work(override, key, tmp_path):
    r = cli([override, f"output_dir={tmp_path}", "logger=none"])
    assert r.returncode == 2 and f"trainer.{key}=" in r.stderr + r.stdout
    assert not (tmp_path / "config.yaml").exists()
