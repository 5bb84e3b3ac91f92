"""Engine guards and measurements: non-finite steps skipped then aborted, empty batches skipped, FLOPs."""
import math

import pytest
import torch

from conftest import metrics_rows, run_stage
from stages import lm


def _poison(monkeypatch, bad_calls, what="loss"):
    """Makes the objective's loss NaN (or its weights zero) on the given micro-batch calls (fault injection)."""
    calls = {"loss": 0, "weights": 0}
    real_loss, real_weights = lm.LMObjective.loss_sum, lm.LMObjective.weights

    def loss_sum(self, model, batch):
        calls["loss"] += 1
        ls, stats = real_loss(self, model, batch)
        return (ls * float("nan"), stats) if what == "loss" and calls["loss"] in bad_calls else (ls, stats)

    def weights(self, batch):
        calls["weights"] += 1
        w = real_weights(self, batch)
        return w * 0 if what == "weights" and calls["weights"] in bad_calls else w

    monkeypatch.setattr(lm.LMObjective, "loss_sum", loss_sum)
    monkeypatch.setattr(lm.LMObjective, "weights", weights)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_leaves_the_weights_alone(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    summary = run_stage(tmp_path, ["trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=5"])
    rows = metrics_rows(tmp_path)
    assert [r["skipped"] for r in rows] == [None, "non-finite", None]
    assert rows[1]["loss"] is None and math.isfinite(rows[2]["loss"]) and rows[2]["skipped_steps"] == 1
    assert summary["skipped_steps"] == 1
    from training.engines.deepspeed import _weights_only_load

    def module_states(step):  # the weights as DeepSpeed saved them after that step
        return _weights_only_load(str(tmp_path / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"))[
            "module"]

    s1, s2 = module_states(1), module_states(2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # the skipped step changed nothing


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_abort_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had a non-finite loss"):
        run_stage(tmp_path, ["trainer.max_steps=10", "trainer.save_every=2", "trainer.max_bad_steps=2"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "DONE").exists()


@pytest.mark.slow
def test_a_global_batch_without_supervised_tokens_is_skipped(tmp_path, monkeypatch):
    _poison(monkeypatch, {2}, what="weights")  # grad_accum 1, one rank: call 2 is all of step 2
    run_stage(tmp_path, ["trainer.max_steps=3"])
    rows = metrics_rows(tmp_path)
    assert rows[1]["skipped"] == "no supervised tokens in the global batch" and rows[1]["loss"] is None
    assert rows[0]["skipped"] is None and rows[2]["skipped"] is None


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_flop_model_matches_torch_flop_counter(family):
    """Our forward FLOPs (LLM + ViT + mergers, attention included) against torch's own operator count."""
    from torch.utils.flop_counter import FlopCounterMode

    from data import rope, shapes
    from data.encode import EncoderConfig, build_encoder
    from training import flops
    from training.models import ModelConfig, build

    b = build(ModelConfig(name=f"tiny_{family}", family=family))
    record, media = shapes.generate(shapes.ShapesConfig(), "caption", 3)
    (s,) = build_encoder(EncoderConfig(), b).encode(dict(key="k", source="caption", record=record, media=media))
    batch = {"input_ids": s["input_ids"][None], "sample_ids": torch.zeros(1, len(s["input_ids"]), dtype=torch.long),
             "image_grid_thw": s["image_grid_thw"]}
    fm = flops.build(b.model, [])  # nothing trainable: multiplier 1 = one forward
    n = len(s["input_ids"])
    with FlopCounterMode(display=False) as counter:
        b.model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], image_grid_thw=s["image_grid_thw"],
                mm_token_type_ids=s["mm_token_type_ids"][None], use_cache=False)
    total = counter.get_total_flops()
    # torch's counter has no formula for the CPU SDPA kernel, so it counts every matmul but not attention:
    # the matmul part must agree exactly, and the attention terms are the textbook ones on top
    thw = s["image_grid_thw"].double()
    patches, frame = float(thw.prod(-1).sum()), float((thw.prod(-1) * thw[:, 1] * thw[:, 2]).sum())
    if fm.vit_window_patches:  # Qwen2.5-VL: windowed blocks attend within windows of vit_window_patches
        vit_attn = 4 * fm.vit_dim * (fm.vit_full_layers * frame +
                                     (fm.vit_layers - fm.vit_full_layers) * patches * fm.vit_window_patches)
    else:
        vit_attn = 4 * fm.vit_dim * fm.vit_layers * frame
    llm_attn = 2 * fm.llm_layers * fm.llm_attn_dim * n * n  # causal: half of QK^T and AV over n x n
    assert fm.micro_batch(batch) - vit_attn - llm_attn == pytest.approx(total, rel=1e-9)
    assert any(isinstance(k, str) for k in counter.get_flop_counts())  # the counter really ran


def test_plot_draws_the_curves_of_a_run(tmp_path):
    import json

    from training import plot

    rows = [{"step": i, "loss": 3.0 - 0.1 * i if i != 3 else None, "loss/caption": 3.1 - 0.1 * i, "lr": 1e-4,
             "tokens_per_s": 1000.0, "samples_per_s": 10.0, "grad_norm": 1.0} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot.plot([tmp_path])
    assert {p.name for p in written} == {"loss.png", "lr.png", "throughput.png", "grad_norm.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
