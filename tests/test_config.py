"""Config tree: every group option composes, and bad keys or options fail with messages naming them."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from conftest import REPO, cli, compose
from stages import build_objective
from training.train import to_job

STAGES = ["vit_align", "s0_merger", "s1_multimodal", "s2_long_32k", "s3_long_256k", "sft", "distill", "dpo", "sapo"]
TINY = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_qwen3_vl_moe"]


def test_conf_groups_have_exactly_the_documented_options():
    opts = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
            for g in ("model", "stage", "data", "engine", "logger")}
    assert opts["stage"] == sorted(STAGES)
    assert opts["model"] == sorted(TINY + ["tiny_qwen3_vl_small", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                           "qwen3_vl_moe"])
    assert opts["engine"] == ["megatron", "zero1", "zero2", "zero3"]
    assert opts["logger"] == ["none", "wandb"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model", TINY)
def test_every_stage_and_tiny_model_composes_into_typed_config(stage, model):
    job = to_job(compose([f"stage={stage}", f"model={model}"]))
    assert job.stage.name == stage and job.model.name == model
    assert set(job.stage.trainable) <= {"vision", "merger", "llm"}
    if job.stage.objective["name"] == "lm":
        assert job.stage.objective["loss_reduction"] in ("token", "sample", "sqrt")


def test_stage_trainable_sets_follow_the_papers():
    trainable = {s: set(to_job(compose([f"stage={s}"])).stage.trainable) for s in STAGES}
    assert trainable["vit_align"] == {"vision", "merger"}
    assert trainable["s0_merger"] == {"merger"}
    for s in ("s1_multimodal", "s2_long_32k", "s3_long_256k"):
        assert trainable[s] == {"vision", "merger", "llm"}
    for s in ("sft", "distill", "dpo", "sapo"):
        assert trainable[s] == {"merger", "llm"}
    seq = {s: to_job(compose([f"stage={s}"])).stage.seq_len for s in STAGES}
    assert (seq["s1_multimodal"], seq["s2_long_32k"], seq["s3_long_256k"]) == (8192, 32768, 262144)


# keys a kind of group file may leave out, and why
NOT_IN_FILE = {
    "model/real": {"min_pixels": "the image processor comes from the checkpoint",
                   "max_pixels": "the image processor comes from the checkpoint"},
    "data/shards": {"shapes": "the synthetic generator's settings mean nothing there",
                    "split": "the sources name their own files"},
    "data/shapes": {"sources": "one source per task, made by the generator",
                    "shapes.name": "the generator's own name, not a setting"},
    "engine/deepspeed": {"tp": "tensor parallelism is engine=megatron's", "pp": "pipeline parallelism is engine=megatron's",
                         "ep": "expert parallelism is engine=megatron's",
                         "vpp": "virtual pipeline stages are engine=megatron's",
                         "sequence_parallel": "megatron's TP sequence parallelism (DeepSpeed's: parallel.sp_size)",
                         "distributed_optimizer": "DeepSpeed shards the optimizer with ZeRO (zero_stage)"},
    "engine/megatron": {"zero_stage": "ZeRO is DeepSpeed's", "offload_optimizer": "DeepSpeed's offload",
                        "offload_params": "DeepSpeed's offload", "raw": "DeepSpeed's config"},
}


def test_every_group_file_has_every_key_of_its_dataclass():
    """A documented key (`model.loss_chunk=16`, `data.encoder.video_fps=1`) must work as a plain override: in struct
    mode a key missing from the group file needs `+`, which the README never says."""
    import dataclasses

    import yaml

    from data.pipeline import DataConfig
    from stages import StageConfig
    from training.engine import EngineConfig
    from training.metrics import LoggerConfig
    from training.models import ModelConfig

    def missing(node: dict, cls, prefix: str) -> list:
        out = []
        for f in dataclasses.fields(cls):
            if f.name not in node:
                out.append(prefix + f.name)
            elif dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
                out += missing(node[f.name] or {}, type(f.default_factory()), f"{prefix}{f.name}.")
        return out

    schemas = {"model": ModelConfig, "stage": StageConfig, "engine": EngineConfig, "data": DataConfig,
               "logger": LoggerConfig}
    for group, cls in schemas.items():
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text())
            kind = {"model": "real" if node.get("path") is not None else "tiny", "data": node.get("name"),
                    "engine": node.get("kind")}.get(group)
            exempt = NOT_IN_FILE.get(f"{group}/{kind}", {})
            gone = [k for k in missing(node, cls, "") if k not in exempt and k.split(".")[0] not in exempt]
            assert not gone, f"conf/{group}/{path.name} lacks {gone}"


def test_documented_keys_override_without_plus():
    job = to_job(compose(["model.loss_chunk=16", "model.tiled_mlp=2", "data.encoder.video_fps=1.0", "engine=zero3",
                          "engine.kind=deepspeed"]))
    assert (job.model.loss_chunk, job.model.tiled_mlp, job.data.encoder.video_fps) == (16, 2, 1.0)


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
        build_objective({"name": "lm", "betta": 0.1})
    with pytest.raises(ValueError, match="unknown"):
        build_objective({"name": "ppo"})
    with pytest.raises(ValueError, match="stage.objective.loss_reduction='mean'"):
        build_objective({"name": "lm", "loss_reduction": "mean"})


def test_the_old_stage_loss_reduction_key_says_where_it_moved():
    with pytest.raises(ValueError, match="stage.loss_reduction=sample moved .* stage.objective.loss_reduction=sample"):
        to_job(compose(["+stage.loss_reduction=sample"]))


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


def _check(*overrides):
    from training.train import check_job

    check_job(to_job(compose(list(overrides))), 1)


@pytest.mark.parametrize("override, message", [
    ("stage.optimizer.lr=-1", r"stage.optimizer.lr=-1.0 must be a finite number > 0"),
    ("stage.optimizer.lr=0", r"stage.optimizer.lr=0.0 must be"),
    ("stage.optimizer.lr=nan", r"stage.optimizer.lr=nan must be"),
    ("stage.optimizer.weight_decay=-0.1", r"stage.optimizer.weight_decay=-0.1 must be a number >= 0"),
    ("stage.optimizer.eps=0", r"stage.optimizer.eps=0.0 must be a number > 0"),
    ("stage.optimizer.grad_clip=-1", r"stage.optimizer.grad_clip=-1.0 must be a number >= 0"),
    ("stage.optimizer.betas=[0.9]", r"stage.optimizer.betas=\[0.9\] must be two numbers in \[0, 1\)"),
    ("stage.optimizer.betas=[0.9,1.0]", r"stage.optimizer.betas=\[0.9, 1.0\] must be two numbers"),
    ("stage.optimizer.betas=[a,0.9]", r"stage.optimizer.betas=\['a', 0.9\] must be two numbers"),
    ("stage.lr_mult.vision=-1", r"stage.lr_mult.vision=-1 must be a finite number >= 0"),
    ("stage.lr_mult.llm=x", r"stage.lr_mult.llm=x must be a finite number >= 0"),
    ("stage.schedule.kind=cosin", r"stage.schedule.kind='cosin' is unknown; choose one of \['cosine', 'linear'"),
    ("stage.schedule.warmup_ratio=1", r"stage.schedule.warmup_ratio=1.0 must be in \[0, 1\)"),
    ("stage.schedule.warmup_ratio=-0.1", r"stage.schedule.warmup_ratio=-0.1 must be in \[0, 1\)"),
    ("stage.schedule.min_lr_ratio=1.5", r"stage.schedule.min_lr_ratio=1.5 must be in \[0, 1\]"),
])
def test_optimizer_and_schedule_values_fail_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        _check(override)


def test_good_optimizer_and_schedule_values_pass():
    _check("stage.optimizer.lr=3e-5", "stage.optimizer.betas=[0.0,0.999]", "stage.optimizer.grad_clip=0",
           "stage.lr_mult.vision=0", "stage.schedule.kind=linear", "stage.schedule.warmup_ratio=0.5",
           "stage.schedule.min_lr_ratio=1")


SHARDS = "data=shards"


@pytest.mark.parametrize("sources, message", [
    ("[{name: docs, url: /d/x.tar}]", r"data.sources\[0\] \(docs\): unknown key\(s\) \['url'\]; missing key\(s\) "
                                      r"\['urls'\]. Known keys: \['name', 'urls', 'weight'"),
    ("[{name: a, urls: /d/a.tar}, {urls: /d/b.tar}]", r"data.sources\[1\]: missing key\(s\) \['name'\]"),
    ("[{name: docs, urls: /d/x.tar, weight: heavy}]", r"data.sources\[0\] \(docs\): weight='heavy' must be a number"),
    ("[{name: docs, urls: /d/x.tar, weight: 0}]", r"data.sources\[0\] \(docs\): weight=0 must be > 0"),
    ("[{name: docs, urls: [1, 2]}]", r"data.sources\[0\] \(docs\): urls=\[1, 2\] must be a path/pattern string"),
    ("[docs]", r"data.sources\[0\]='docs' is not a mapping"),
])
def test_data_sources_entries_fail_naming_entry_and_key(sources, message):
    with pytest.raises(ValueError, match=message):
        _check(SHARDS, f"data.sources={sources}")


def test_data_sources_are_checked_by_check_job_before_any_model(tmp_path):
    _check(SHARDS, "data.sources=[{name: docs, urls: '/d/x-{0..3}.tar', weight: 2, shuffle_buffer: 8}]")
    # the CLI: the error comes from check_job, before a model is built or the output directory is written
    r = cli([SHARDS, "data.sources=[{name: docs, url: /d/x.tar}]", f"output_dir={tmp_path}", "logger=none"])
    assert r.returncode == 2 and "data.sources[0] (docs): unknown key(s) ['url']" in r.stderr + r.stdout
    assert not (tmp_path / "config.yaml").exists()
