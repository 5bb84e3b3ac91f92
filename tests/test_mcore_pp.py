"""training/mcore pipeline parallelism: per-stage conversion and megatron's pipeline schedules on CPU/gloo.

- conversion per (tp, pp, vpp) rank: each chunk holds exactly its layers (renumbered), the embedding only on the
  first chunk, the final norm and head only on the last (a tied head's copy of the embedding there); HF -> chunks ->
  HF is bit-exact; resharding (tp2, pp2) -> (tp1, pp1), pp2 -> pp1 and pp1 -> (pp2, vpp2) equals converting directly;
  convert.py's layer split is megatron's (`get_transformer_layer_offset` / `get_num_layers_to_build`);
- the schedule path in one process (pp=1, megatron's no-pipelining schedule under shim.cuda_factories_on_cpu):
  per-micro-batch loss sums equal HF's, and the decoder's and the ViT's gradients equal HF's;
- under torchrun (tests/dist/mcore_pp.py): PP=2 (1F1B), PP=2 x VPP=2 (interleaved) and TP=2 x PP=2 against PP=1 in
  one process: the same losses (and HF's), the same gradients of every decoder weight by HF name and of the ViT,
  for Qwen3-VL (DeepStack features crossing stages) and tied embeddings.
The helpers `microbatches` / `forward_step` / `hf_loss` are shared with tests/dist/mcore_pp.py.
"""
from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch

from data.pack import PackConfig, collate
from test_mcore import GRAD_RTOL, _visual, hf_forward, lm_state, relative_error, tiny
from test_packing import image_sample, text_sample, video_sample
from training.vlm import VLM

SEQ_LEN = 128  # every micro-batch is one packed row of this many tokens: a fixed send shape
ROWS = [[("image", 0), ("text", 1), ("video", 2)], [("text", 0), ("image", 1)], [("text", 2)],
        [("image", 3), ("video", 1)]]  # the third is text only (no DeepStack features: zeros travel)
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------- shared with tests/dist/mcore_pp.py
def microbatches(bundle, m: int) -> list[dict]:
    """`m` micro-batches, each one packed row of SEQ_LEN tokens (data/pack.py, as training feeds them) with its
    M-RoPE ids and cu_seqlens, and the HF reference's inputs (no-grad ViT features, tests/test_mcore.py)."""
    make = {"image": image_sample, "text": text_sample, "video": lambda b, i: video_sample(b, i, t=2)}
    out = []
    for row in ROWS[:m]:
        cfg = PackConfig(seq_len=SEQ_LEN, buffer_size=4, pad_id=bundle.tokenizer.pad_token_id, attention="varlen")
        packer = cfg.build()
        rows = [r for kind, i in row for r in packer.add(make[kind](bundle, i))] + packer.flush()
        assert len(rows) == 1
        batch = collate(rows, cfg)
        ids = batch["input_ids"].reshape(1, SEQ_LEN)
        feats, deepstack = _visual(bundle, batch, ids)
        hf_kwargs = VLM(bundle.model).decoder_inputs(batch, ids, None, packed=True)
        out.append(dict(batch=batch, ids=ids, labels=batch["labels"].reshape(1, SEQ_LEN), feats=feats,
                        deepstack=deepstack, hf=hf_kwargs, position_ids=hf_kwargs["position_ids"],
                        cu_seqlens=batch["cu_seqlens"], visual_pos_masks=deepstack.get("visual_pos_masks")))
    return out


def deepstack_layers(bundle) -> int:
    return len(getattr(bundle.model.config.vision_config, "deepstack_visual_indexes", None) or [])


def _targets(mb: dict):
    target = mb["labels"][:, 1:]
    return target != -100, target


def hf_loss(model, mb: dict, grad: bool = False) -> torch.Tensor:
    """The HF model's summed cross-entropy over the row's supervised next tokens; `grad`: with the ViT in the
    graph (its DeepStack features too), else on the stored no-grad features."""
    if grad:
        vlm = VLM(model)
        feats, _ = vlm.encode_visual(mb["batch"])
        embeds, deepstack = vlm.merge(mb["ids"], model.get_input_embeddings()(mb["ids"]), feats)
        hidden = model.model.language_model(input_ids=None, inputs_embeds=embeds, use_cache=False, **mb["hf"],
                                            **deepstack).last_hidden_state
        logits = model.lm_head(hidden)
    else:
        with torch.no_grad():
            logits = hf_forward(model, mb)[1]
    sup, target = _targets(mb)
    return torch.nn.functional.cross_entropy(logits[:, :-1][sup], target[sup], reduction="sum")


def _loss(chunk, mb: dict, hidden: torch.Tensor):
    """megatron's loss_func of the last stage: (Σ CE, token count, logs), vocab-parallel (training/mcore/loss.py)."""
    from megatron.core import parallel_state as ps

    from training.mcore.loss import VocabParallelNLL

    sup, target = _targets(mb)
    t = target[sup]
    loss, _ = VocabParallelNLL.apply(hidden[:, :-1][sup], chunk.head_weight(), t, torch.ones(len(t)), 64,
                                     chunk.vocab_size, ps.get_tensor_model_parallel_group())
    return loss, torch.tensor(len(t), dtype=torch.int), {"loss": loss.detach().clone()}


def forward_step(bundle, data_iterator, chunk):
    """megatron's forward_step_func: the first stage runs the ViT (with gradients), the embedding and the merge;
    every stage runs its layers (training/mcore/pipeline.py `stage_forward`); the last adds the loss."""
    from training.mcore import pipeline

    mb = next(data_iterator)
    kw = dict(position_ids=mb["position_ids"], cu_seqlens=mb["cu_seqlens"], visual_pos_masks=mb["visual_pos_masks"])
    if chunk.pre_process:
        vlm = VLM(bundle.model)
        feats, _ = vlm.encode_visual(mb["batch"])
        embeds, deepstack = vlm.merge(mb["ids"], chunk.embed(mb["ids"]), feats)
        kw.update(inputs_embeds=embeds, **deepstack)
    out = pipeline.stage_forward(chunk, deepstack_layers=deepstack_layers(bundle), **kw)
    return out, partial(_loss, chunk, mb)


def run_schedule(bundle, chunks, mbs) -> list[float]:
    """One forward/backward over the micro-batches, gradients finalised; the per-micro-batch loss sums (last
    stage; [] elsewhere)."""
    from training.mcore import pipeline

    logs = pipeline.forward_backward(chunks, partial(forward_step, bundle), mbs, seq_length=SEQ_LEN,
                                     deepstack_layers=deepstack_layers(bundle))
    pipeline.finalize_grads(chunks)
    return [float(x["loss"]) for x in logs]


def vit_grads(model) -> dict:
    return {k: p.grad.clone() for k, p in model.model.visual.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- conversion (no process group needed)
LAYOUTS = [(1, None), (2, None), (2, 2), (4, None)]  # (pp, vpp) of the 4-layer tiny decoder


def _chunks(hf, tc, tp, pp, vpp):
    """shards[tp_rank][chunk] in model order (chunk j on pipeline rank j % pp, virtual stage j // pp)."""
    from training.mcore.convert import hf_to_mcore

    v = vpp or 1
    return [[hf_to_mcore(hf, tc, tp, r, pp=pp, pp_rank=j % pp, vpp=vpp, vp_stage=None if vpp is None else j // pp)
             for j in range(pp * v)] for r in range(tp)]


@pytest.mark.parametrize("family,tied", [("qwen3_vl", False), ("qwen3_vl", True), ("qwen2_5_vl", True)])
def test_pp_round_trip_is_exact(family, tied):
    """HF -> (tp, pp, vpp) chunks -> HF, torch.equal, for every layout; each chunk holds only its layers."""
    from training.mcore.convert import merge_pp, mcore_to_hf

    model = tiny(family, tied).model
    tc = model.config.get_text_config()
    hf = lm_state(model)
    for tp in (1, 2):
        for pp, vpp in LAYOUTS:
            shards = _chunks(hf, tc, tp, pp, vpp)
            n = tc.num_hidden_layers // len(shards[0])
            for j, c in enumerate(shards[0]):
                last = j == len(shards[0]) - 1
                assert {k.split(".")[2] for k in c if k.startswith("decoder.layers.")} == {str(i) for i in range(n)}
                assert ("embedding.word_embeddings.weight" in c) == (j == 0)
                assert ("decoder.final_layernorm.weight" in c) == last
                assert ("output_layer.weight" in c) == (last and not (tied and j == 0))
            back = mcore_to_hf([merge_pp(c, tc, tied) for c in shards], tc)
            assert back.keys() == hf.keys(), (tp, pp, vpp)
            for k in hf:
                assert torch.equal(back[k], hf[k]), (tp, pp, vpp, k)


def test_pp_split_layout():
    """Chunk j's local layer k is HF layer j*n + k (a random-init weight, so a wrong layer would differ); a tied
    last stage's output_layer is the embedding's vocabulary rows, as on the first stage."""
    from training.mcore.convert import hf_to_mcore

    model = tiny("qwen3_vl", tied=True).model
    tc = model.config.get_text_config()
    hf = lm_state(model)
    for pp, vpp in LAYOUTS[1:]:
        for j, c in enumerate(_chunks(hf, tc, 1, pp, vpp)[0]):
            n = tc.num_hidden_layers // (pp * (vpp or 1))
            for k in range(n):
                assert torch.equal(c[f"decoder.layers.{k}.mlp.linear_fc2.weight"],
                                   hf[f"model.language_model.layers.{j * n + k}.mlp.down_proj.weight"])
    last = hf_to_mcore(hf, tc, 2, 1, pp=2, pp_rank=1)
    first = hf_to_mcore(hf, tc, 2, 1, pp=2, pp_rank=0)
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    assert last["output_layer.weight"].data_ptr() != first["embedding.word_embeddings.weight"].data_ptr()


@pytest.mark.parametrize("tied", [False, True])
def test_reshard_pp(tied):
    """(tp2, pp2) -> (tp1, pp1), pp2 -> pp1 at tp2, and (tp1, pp1) -> (tp2, pp2, vpp2): equal to direct conversion."""
    from training.mcore.convert import reshard_pp

    model = tiny("qwen3_vl", tied).model
    tc = model.config.get_text_config()
    hf = lm_state(model)

    def same(a, b):
        assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
        for x, y in zip(a, b):
            for cx, cy in zip(x, y):
                assert cx.keys() == cy.keys() and all(torch.equal(cx[k], cy[k]) for k in cx)

    same(reshard_pp(_chunks(hf, tc, 2, 2, None), tc, tied, 1, 1), _chunks(hf, tc, 1, 1, None))
    same(reshard_pp(_chunks(hf, tc, 2, 2, None), tc, tied, 2, 1), _chunks(hf, tc, 2, 1, None))
    same(reshard_pp(_chunks(hf, tc, 1, 1, None), tc, tied, 2, 2, 2), _chunks(hf, tc, 2, 2, 2))


def test_stage_layers_are_megatrons():
    """convert.py's split equals megatron's layer offset and count for every (pp rank, virtual stage); uneven
    splits are refused."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from training.mcore.convert import stage_layers
    from training.mcore.model import transformer_config

    tc = tiny("qwen2_vl").model.config.get_text_config()
    for layers, pp, vpp in ((4, 2, None), (4, 2, 2), (4, 4, None), (8, 2, 2), (12, 3, 2)):
        tc.num_hidden_layers = layers
        cfg = transformer_config(tc, 1, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
        for r in range(pp):
            for vp in [None] if vpp is None else range(vpp):
                want = get_transformer_layer_offset(cfg, vp, r)
                assert stage_layers(layers, pp, r, vpp, vp) == range(want, want + get_num_layers_to_build(cfg, vp, r))
    with pytest.raises(ValueError, match="must split evenly"):
        stage_layers(4, 3)


# ---------------------------------------------------------------- the schedule in one process (pp=1)
@pytest.fixture(scope="module")
def parallel():
    from training.mcore import shim

    if torch.cuda.is_available():
        pytest.skip("CPU tests: training/mcore/shim.py is off on CUDA machines")
    created = shim.init_model_parallel(1)
    yield
    shim.destroy(created)


def test_cuda_factories_on_cpu(parallel):
    from training.mcore import shim

    with shim.cuda_factories_on_cpu():
        assert torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros([], device="cuda")


@pytest.mark.parametrize("family,tied", [("qwen3_vl", False), ("qwen2_vl", True)])
def test_schedule_pp1_equals_hf(parallel, family, tied):
    """megatron's no-pipelining schedule over 3 packed micro-batches: each loss sum is HF's, and the summed
    gradients of every decoder weight (by HF name) and of the ViT are HF's."""
    from training.mcore.convert import mcore_to_hf
    from training.mcore.pipeline import build_chunks

    bundle = tiny(family, tied)
    model = bundle.model
    tc = model.config.get_text_config()
    mbs = microbatches(bundle, 3)
    chunks = build_chunks(tc, lm_state(model))
    losses = run_schedule(bundle, chunks, mbs)
    mine = vit_grads(model)
    model.zero_grad(set_to_none=True)
    for mb, loss in zip(mbs, losses):
        assert abs(loss - float(hf_loss(model, mb))) <= LOSS_RTOL * abs(loss)
    for mb in mbs:  # HF's gradients of the same summed loss, the ViT included
        hf_loss(model, mb, grad=True).backward()
    grads = mcore_to_hf([{k: p.grad for k, p in chunks[0].named_parameters()}], tc)
    hf_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None and "visual" not in k}
    assert set(hf_grads) == set(grads) - ({"lm_head.weight"} if tied else set())
    for k, g in hf_grads.items():
        assert relative_error(grads[k], g) <= GRAD_RTOL, k
    vit = vit_grads(model)
    assert vit.keys() == mine.keys() and len(vit) > 0
    for k, g in vit.items():
        assert relative_error(mine[k], g) <= GRAD_RTOL, k


# ---------------------------------------------------------------- pipeline parallelism under torchrun
def _torchrun(nproc: int, mode: str, cases: int):
    from tests.conftest import REPO, clean_env

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(REPO / "tests" / "dist" / "mcore_pp.py"), mode],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**clean_env(), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == cases, p.stdout


@pytest.mark.slow  # ~12 s on 2 cores, most of it the processes importing torch/transformers/megatron
def test_pp2_under_torchrun_equals_pp1():
    """2 processes: PP=2 1F1B (Qwen3-VL, a DeepStack feature crossing the stage boundary; Qwen2.5-VL tied) and
    PP=2 x VPP=2 interleaved (Qwen3-VL tied, two features crossing) against PP=1 and HF."""
    _torchrun(2, "pp2", 3)


@pytest.mark.slow  # ~25 s on 2 cores: 4 processes
def test_tp2_pp2_under_torchrun_equals_pp1():
    """4 processes: TP=2 x PP=2 (Qwen3-VL tied) and TP=2 x PP=2 x VPP=2 (Qwen3-VL) against PP=1 and HF."""
    _torchrun(4, "tp2pp2", 2)
