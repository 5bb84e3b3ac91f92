"""stage.eval (held-out loss every N steps) and the per-source epoch counters."""
import json
import logging

import pytest
import torch
import webdataset as wds

from conftest import compose, metrics_rows, run_stage
from data.pipeline import DataConfig, Layout, Pipeline, eval_source_configs
from data.shards import write_tar
from training import evaluate, models
from training.models import ModelConfig
from training.train import check_job, to_job


def write_shards(d, n_shards: int, per_shard: int) -> list[str]:
    """Text documents; sample j of shard i has key f"s{i:03d}-{j:03d}"."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        samples = [(f"s{i:03d}-{j:03d}", {"json": json.dumps(
            {"content": [{"type": "text", "text": f"document {i} {j}: " + "red square " * (1 + j % 4)}]}).encode()})
            for j in range(per_shard)]
        paths.append(str(d / f"s-{i:04d}.tar"))
        write_tar(paths[-1], samples)
    return paths


def _hf_loss(hf_dir, task: str, samples: int, reduction: str = "token") -> float:
    """The lm loss of the first `samples` held-out `task` samples under `reduction`, from the HF model's own loss
    (the mean CE of one sample's n supervised tokens) on each sample alone (no packing), the samples read by
    webdataset in shard order: Σ mean_i·w_i / Σ w_i with w_i = n_i (token), 1 (sample), √n_i (sqrt)."""
    power = {"token": 1.0, "sample": 0.0, "sqrt": 0.5}[reduction]
    model_type = json.loads((hf_dir / "config.json").read_text())["model_type"]
    family = next(n for n, f in models.FAMILIES.items() if f.model_type == model_type)
    bundle = models.build(ModelConfig(family=family, path=str(hf_dir)))
    bundle.model.eval()
    (src,) = eval_source_configs(DataConfig(), [task])
    total = count = 0.0
    ds = wds.WebDataset(src.urls, shardshuffle=False)
    for i, s in enumerate(ds):
        if i == samples:
            break
        media = {k: v for k, v in s.items() if not k.startswith("__") and k != "json"}
        (enc,) = evaluate.encode(bundle, json.loads(s["json"]), media)
        inputs = evaluate._inputs(enc, enc["input_ids"], enc["mm_token_type_ids"])
        n = int((enc["labels"][1:] != -100).sum())
        with torch.no_grad():
            loss = bundle.model(**inputs, labels=enc["labels"][None]).loss
        total, count = total + float(loss) * n ** power, count + n ** power
    return total / count


@pytest.mark.slow
def test_eval_loss_is_the_hf_loss_of_the_model_on_the_first_held_out_samples(tmp_path, caplog):
    """At the last step the evaluated weights are the export's: eval/loss/<task> must equal HF's own loss on the
    same samples one at a time (the eval batches are packed rows of several samples: packing must not leak)."""
    caplog.set_level(logging.INFO, logger="training")
    run_stage(tmp_path, ["stage=sft", "trainer.max_steps=3", "stage.eval.every=2", "stage.eval.samples=7",
                         "stage.eval.sources=[vqa,caption]", "trainer.micro_batch_size=2"])
    rows = metrics_rows(tmp_path)
    assert [("eval/loss" in r) for r in rows] == [False, True, True]  # every 2 steps and at the last one
    assert "step 2: held-out loss" in caplog.text and "held-out vqa: 7 samples" in caplog.text
    last = rows[-1]
    for task in ("vqa", "caption"):
        assert last[f"eval/loss/{task}"] == pytest.approx(_hf_loss(tmp_path / "hf", task, 7), rel=1e-5)
    assert rows[1]["eval/loss/vqa"] != last["eval/loss/vqa"]  # the model changed between the evaluations
    assert min(last["eval/loss/vqa"], last["eval/loss/caption"]) <= last["eval/loss"] <= max(
        last["eval/loss/vqa"], last["eval/loss/caption"])


def test_stage_eval_settings_that_cannot_work_are_refused():
    def check(*overrides):
        check_job(to_job(compose(list(overrides))), 1)

    with pytest.raises(ValueError, match=r"stage.eval.every=5 needs stage.eval.sources"):
        check("stage.eval.every=5")
    with pytest.raises(ValueError, match=r"shapes task.*\['nope'\]"):
        check("stage.eval.every=5", "stage.eval.sources=[vqa,nope]")
    with pytest.raises(ValueError, match=r"the sapo objective has no held-out loss"):
        check("stage=sapo", "data.shapes.tasks=[rl]", "stage.eval.every=5", "stage.eval.sources=[rl]")
    with pytest.raises(ValueError, match=r"stage.eval.sources\[0\]='val'.*names held-out shards"):
        check("data=shards", "data.sources=[{name: a, urls: /x.tar}]", "stage.eval.every=5", "stage.eval.sources=[val]")
    with pytest.raises(ValueError, match=r"stage.eval.sources\[0\] \(val\): missing key\(s\) \['urls'\]"):
        check("data=shards", "data.sources=[{name: a, urls: /x.tar}]", "stage.eval.every=5",
              "stage.eval.sources=[{name: val}]")
    with pytest.raises(ValueError, match=r"samples=0"):
        check("stage.eval.every=5", "stage.eval.samples=0", "stage.eval.sources=[vqa]")
    check("stage.eval.every=0", "stage.eval.sources=[vqa]")  # off: the sources are not read


def test_a_held_out_source_smaller_than_samples_gives_what_it_has_once(tmp_path):
    from data.pipeline import eval_micro_batches

    urls = write_shards(tmp_path, n_shards=2, per_shard=3)
    bundle = models.build(ModelConfig())
    layout = Layout(rank=0, world=1, micro_batch=1, grad_accum=1, seq_len=256)
    (src,) = eval_source_configs(DataConfig(name="shards", sources=[{"name": "a", "urls": urls}]),
                                 [{"name": "val", "urls": urls}])
    batches, _ = eval_micro_batches(src, DataConfig(), bundle, layout, samples=50)
    keys = [m["key"] for b in batches for m in b["meta"]]
    assert sorted(keys) == sorted(f"s{i:03d}-{j:03d}" for i in range(2) for j in range(3))  # each once, in order
    again, _ = eval_micro_batches(src, DataConfig(), bundle, layout, samples=4)
    assert sum(len(b["sources"]) for b in again) == 4


def test_epoch_counter_per_source_counts_wraps_and_survives_a_restore(tmp_path):
    small = write_shards(tmp_path / "s", n_shards=1, per_shard=8)
    big = write_shards(tmp_path / "b", n_shards=2, per_shard=100)
    cfg = DataConfig(name="shards", sources=[{"name": "small", "urls": small}, {"name": "big", "urls": big}],
                     pack_buffer=2)
    bundle = models.build(ModelConfig())
    layout = Layout(rank=0, world=1, micro_batch=1, grad_accum=1, seq_len=48)
    pipe = Pipeline(cfg, None, bundle, layout)
    seen = []
    for _ in range(12):
        pipe.next_step()
        seen.append(pipe.metrics()["epoch/small"])
    assert seen[0] == 0 and seen[-1] >= 1 and seen == sorted(seen)  # 8 samples: it wrapped
    assert pipe.metrics()["epoch/big"] == 0
    state, before = pipe.state_dict(), pipe.metrics()
    again = Pipeline(cfg, None, bundle, layout)
    again.load_state_dict(state)
    assert {k: v for k, v in again._chain.metrics().items() if k.startswith("epoch/")} == \
        {k: v for k, v in before.items() if k.startswith("epoch/")}
