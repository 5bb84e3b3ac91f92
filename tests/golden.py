"""Golden runs: the per-step losses and gradient norms of short fixed-seed runs, recorded from main before the
model step was rewritten (issue 13), so that the rewrite is checked against what the old code computed.

`python tests/golden.py` re-records tests/data/golden.json (only do that when a change is *meant* to alter
the numbers, and say why in the commit). tests/test_golden.py reruns every entry and compares.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
FILE = HERE / "data" / "golden.json"
FAMILIES = ("tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl")
STEPS = 20

# every stage kind the loop has: lm on images + video (packed rows, grad accumulation, sqrt weights), SFT on
# chats, DPO with its frozen reference, SAPO with sampled rollouts, shared-image tiling and the k3 KL reference
COMMON = [f"trainer.max_steps={STEPS}", "trainer.save_every=0", "trainer.seed=3"]
STAGES = {
    "s1_multimodal": ["stage=s1_multimodal", "data.shapes.tasks=[caption,vqa,video,text]", "stage.seq_len=192",
                      "trainer.micro_batch_size=1", "trainer.grad_accum=2", "stage.optimizer.lr=1e-3"],
    "sft": ["stage=sft", "data.shapes.tasks=[vqa,caption]", "stage.mixture={vqa: 3, caption: 1}",
            "stage.seq_len=192", "trainer.micro_batch_size=1", "stage.optimizer.lr=1e-3"],
    "dpo": ["stage=dpo", "data.shapes.tasks=[preference]", "stage.seq_len=192", "trainer.micro_batch_size=1",
            "stage.optimizer.lr=2e-4"],
    "sapo": ["stage=sapo", "data.shapes.tasks=[rl]", "stage.seq_len=128", "trainer.micro_batch_size=1",
             "stage.objective.num_generations=4", "stage.objective.max_new_tokens=6",
             "stage.objective.kl_beta=0.04", "stage.optimizer.lr=2e-4"],
}


def cases() -> list[tuple[str, str]]:
    return [(m, s) for s in STAGES for m in FAMILIES]


def run(model: str, stage: str, out: Path) -> dict:
    """{"loss": [...], "grad_norm": [...]} of one golden run, in this process."""
    sys.path.insert(0, str(HERE))
    from conftest import metrics_rows, run_stage

    from stages import rewards

    saved = dict(rewards.REGISTRY)
    if stage == "sapo":  # a random tiny model never says a shapes answer: score by length parity, so groups differ
        from reward_helpers import odd_length

        rewards.REGISTRY.update(exact_match=odd_length, numeric=odd_length)
    try:
        run_stage(out, [f"model={model}", *STAGES[stage], *COMMON])
    finally:
        rewards.REGISTRY.clear()
        rewards.REGISTRY.update(saved)
    rows = metrics_rows(out)
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


if __name__ == "__main__":
    only = sys.argv[1:]
    found = json.loads(FILE.read_text()) if FILE.is_file() else {}
    for model, stage in cases():
        key = f"{model}/{stage}"
        if only and key not in only and stage not in only and model not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            found[key] = run(model, stage, Path(tmp) / "run")
        print(key, found[key]["loss"][:3], flush=True)
        FILE.parent.mkdir(exist_ok=True)
        FILE.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
