"""training/mcore MoE: the Qwen3-VL-MoE text decoder on megatron-core (MoELayer, expert parallelism) against HF.

- one process (ep=1): on a packed row (image, text and video samples, real M-RoPE ids, DeepStack) the Decoder's
  hidden states and logits equal HF's Qwen3VLMoe text model + lm_head (1e-5, float32); every MoE layer routes each
  token to the same top-k experts with the same renormalised weights and logits (the router taps, found by
  training/moe.py's `routers` as HF's routers are); without the renormalisation (megatron's pre-softmax top-k) the
  hidden states differ (the comparison would catch it);
- the gradients of every parameter by HF name (router, each expert's gate_up/down slice, attention, norms,
  embedding, head) equal HF's, for sum(logits * w) plus training/moe.py's RouterStats aux loss on the router logits
  the taps expose;
- a layer in mlp_only_layers (and the layers decoder_sparse_step skips) stays a dense MLP, as in HF;
- conversion: HF -> (tp, ep) shards -> HF is bit-exact; an EP rank holds exactly its experts renumbered from 0;
  (tp2, ep2) -> (tp1, ep1) and ep1 -> ep2 resharding equals converting directly;
- expert parallelism: EP=2 under torchrun (gloo, CPU; tests/dist/mcore_moe.py) equals EP=1 on the same two ranks
  and HF: the loss and every gradient by HF name, with tokens of each rank routed to the other rank's experts, and a
  mis-assignment of experts to EP ranks changes the loss.
The in-process decoder tests run on CPU only (training/mcore/shim.py); they skip on CUDA machines.
The helpers `tiny_moe` / `rows` / `recorded` / `ce` / `mc_loss` / `compare_grads` are shared with tests/dist/mcore_moe.py.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from test_mcore import ATOL, GRAD_RTOL, hf_forward, lm_state, logit_weights, mc_forward, relative_error
from test_mcore_pp import microbatches
from training.models import ModelConfig, build

ROUTE_ATOL = 1e-6  # router logits and top-k weights


# ---------------------------------------------------------------- shared with tests/dist/mcore_moe.py
def tiny_moe(**text):
    """The tiny Qwen3-VL-MoE (4 layers, 4 experts, top-2, every layer sparse unless `text` says otherwise), eval."""
    bundle = build(ModelConfig(name="tiny_qwen3_vl_moe", family="qwen3_vl_moe", tiny={"text": text}))
    bundle.model.eval()
    return bundle


def rows(bundle, m: int) -> list[dict]:
    """`m` packed rows of 128 tokens (tests/test_mcore_pp.py `microbatches`) with the Decoder's kwargs as "mc"."""
    out = microbatches(bundle, m)
    for mb in out:
        mb["mc"] = dict(position_ids=mb["position_ids"], cu_seqlens=mb["cu_seqlens"])
        mb["valid"] = torch.ones_like(mb["ids"], dtype=torch.bool)
    return out


@contextmanager
def recorded(module):
    """{layer: (logits, top-k weights, top-k experts)} of each router call in `module`: HF's routers, or the
    Decoder's taps, both found by training/moe.py `routers` (the way RouterStats finds them)."""
    from training.moe import routers

    out = {}
    hooks = [m.register_forward_hook(lambda m, i, o, layer=layer: out.__setitem__(layer, tuple(t.detach() for t in o)))
             for layer, m in routers(module)]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


def ce(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """The summed cross-entropy over the row's supervised next tokens (as test_mcore_pp's `hf_loss`)."""
    target = mb["labels"][:, 1:]
    sup = target != -100
    return torch.nn.functional.cross_entropy(logits[:, :-1][sup], target[sup], reduction="sum")


def mc_loss(model, dec, mb) -> torch.Tensor:
    """`ce` of the Decoder's logits (the padded vocabulary cut)."""
    return ce(mc_forward(model, dec, mb)[1][..., :dec.vocab_size], mb)


def compare_grads(grads: dict, hf_grads: dict, what="") -> None:
    """Every HF gradient has its converted megatron one, within GRAD_RTOL; the 3-D expert tensors expert by
    expert (a mis-assigned or missing expert cannot hide in the norm of the others)."""
    assert set(hf_grads) <= set(grads), (what, set(hf_grads) - set(grads))
    for k, g in hf_grads.items():
        for i, (a, b) in enumerate(zip(grads[k], g) if g.ndim == 3 else [(grads[k], g)]):
            assert relative_error(a, b) <= GRAD_RTOL, (what, k, i, relative_error(a, b))


# ---------------------------------------------------------------- in-process tests (tp=1, ep=1)
@pytest.fixture(scope="module")
def parallel():
    """megatron's parallel state at tp=1, ep=1 on a one-process gloo group (see tests/test_mcore.py)."""
    from training.mcore import shim

    if torch.cuda.is_available():
        pytest.skip("CPU decoder tests: training/mcore/shim.py is off on CUDA machines")
    created = shim.init_model_parallel(1)
    yield
    shim.destroy(created)


@pytest.fixture(scope="module")
def moe():
    bundle = tiny_moe()
    return bundle, rows(bundle, 1)[0]


def _decoder(bundle, config=None):
    from training.mcore.convert import hf_to_mcore
    from training.mcore.model import Decoder

    tc = bundle.model.config.get_text_config()
    dec = Decoder(tc, config=config)
    dec.load(hf_to_mcore(bundle.model.state_dict(), tc, tp=1, rank=0))
    return dec


def test_moe_decoder_and_routing_equal_hf(parallel, moe):
    """Packed row with an image, a video and DeepStack: hidden states and logits within 1e-5; per MoE layer the same
    top-k experts per token, the same renormalised weights (summing to 1) and router logits."""
    from training.mcore.moe import Router

    bundle, mb = moe
    dec = _decoder(bundle)
    vocab = dec.vocab_size
    assert len(mb["deepstack"]["deepstack_visual_embeds"]) == 3 and mb["deepstack"]["visual_pos_masks"].any()
    assert sum(isinstance(m, Router) for m in dec.modules()) == 4
    with torch.no_grad(), recorded(bundle.model) as hf_route, recorded(dec) as mc_route:
        hidden, logits = hf_forward(bundle.model, mb)
        mh, ml = mc_forward(bundle.model, dec, mb)
    assert (mh - hidden).abs().max() <= ATOL
    assert (ml[..., :vocab] - logits).abs().max() <= ATOL
    assert sorted(hf_route) == sorted(mc_route) == [0, 1, 2, 3]
    for layer, (lg, w, e) in hf_route.items():
        mlg, mw, me = mc_route[layer]
        assert lg.shape == mlg.shape == (mb["ids"].numel(), 4) and e.shape == me.shape == (mb["ids"].numel(), 2)
        assert torch.equal(e.sort(-1).values, me.sort(-1).values), layer  # the same experts for every token
        assert (mlg - lg).abs().max() <= ROUTE_ATOL
        order_hf, order_mc = e.argsort(-1), me.argsort(-1)
        assert (mw.gather(-1, order_mc) - w.gather(-1, order_hf)).abs().max() <= ROUTE_ATOL
        assert torch.allclose(mw.sum(-1), torch.ones(len(mw)))  # renormalised over the top-k
        assert len(e.unique()) == 4  # every expert gets tokens: all four experts are compared


def test_unrenormalised_top_k_is_caught(parallel, moe):
    """megatron's pre-softmax top-k (the un-renormalised p_i, the same experts) is not HF's routing: the hidden
    states move by far more than the tolerance, so the comparison above checks the renormalisation."""
    from training.mcore.model import transformer_config

    bundle, mb = moe
    tc = bundle.model.config.get_text_config()
    dec = _decoder(bundle, config=transformer_config(tc, 1, moe_router_pre_softmax=True))
    with torch.no_grad():
        hidden, _ = hf_forward(bundle.model, mb)
        mh, _ = mc_forward(bundle.model, dec, mb)
    assert (mh - hidden).abs().max() > 1e3 * ATOL


def test_moe_gradients_equal_hf(parallel, moe):
    """The gradients of sum(logits * w) + RouterStats' aux loss (training/moe.py, on the router logits the taps
    expose) for every parameter, converted back to HF names; the aux-loss values equal too."""
    from training.mcore.convert import mcore_to_hf
    from training.moe import MoeSettings, RouterStats

    bundle, mb = moe
    dec = _decoder(bundle)
    dec.sp = bundle.model.sp = None  # RouterStats reads the engine's sequence-parallel slicer from the model
    tc = bundle.model.config.get_text_config()
    w = logit_weights(mb, tc.vocab_size)
    aux = []
    from training.mcore.moe import routers
    from training.vlm import VLM

    def hf_run():  # HF's own router-logit outputs, as training/vlm.py asks for them
        model = bundle.model
        embeds, _ = VLM(model).merge(mb["ids"], model.get_input_embeddings()(mb["ids"]), mb["feats"])
        out = model.model.language_model(input_ids=None, inputs_embeds=embeds, use_cache=False, **mb["hf"],
                                         **mb["deepstack"], output_router_logits=True)
        return model.lm_head(out.last_hidden_state), out.router_logits

    def mc_run():  # the Decoder's routers' last logits, as the engine's _LanguageModel hands them over
        logits = mc_forward(bundle.model, dec, mb)[1][..., :tc.vocab_size]
        return logits, [r.take() for _, r in routers(dec)]

    for model, run in ((bundle.model, hf_run), (dec, mc_run)):
        stats = RouterStats(model, MoeSettings(aux_loss_coef=0.1, z_loss_coef=0.01), tc)
        stats.begin(None, [mb["batch"]])
        with stats.watch(mb["batch"]):
            logits, router_logits = run()
            stats.record(router_logits)
        loss = stats.loss()
        stats.step_sums()
        aux.append(float(loss))
        ((logits * w).sum() + 1e3 * loss).backward()  # the aux loss scaled to weigh in the router gradients
    assert aux[0] > 0 and abs(aux[1] - aux[0]) <= 1e-5 * aux[0]
    grads = mcore_to_hf([{k: p.grad for k, p in dec.named_parameters()}], tc)
    hf_grads = {k: p.grad for k, p in bundle.model.named_parameters() if p.grad is not None}
    assert {k for k in hf_grads if ".mlp.gate." in k or ".experts." in k} == {
        f"model.language_model.layers.{i}.mlp.{n}" for i in range(4)
        for n in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    assert set(hf_grads) == set(grads)
    compare_grads(grads, hf_grads)


def test_mlp_only_layer_stays_dense(parallel):
    """mlp_only_layers=[1]: layer 1 is megatron's dense MLP (HF's Qwen3VLMoeTextMLP, intermediate_size), the others
    MoE; the conversion round trip is exact and the forward equals HF's, three routers recording.
    decoder_sparse_step=2 makes layers 1 and 3 sparse, as HF builds them."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from training.mcore.convert import hf_to_mcore, mcore_to_hf, sparse_layers

    def hf_sparse(model):
        return [type(l.mlp).__name__.endswith("SparseMoeBlock") for l in model.model.language_model.layers]

    stepped = tiny_moe(decoder_sparse_step=2).model
    assert sparse_layers(stepped.config.get_text_config()) == hf_sparse(stepped) == [False, True, False, True]
    bundle = tiny_moe(mlp_only_layers=[1])
    tc = bundle.model.config.get_text_config()
    assert sparse_layers(tc) == hf_sparse(bundle.model) == [True, False, True, True]
    dec = _decoder(bundle)
    assert [type(l.mlp) for l in dec.decoder.layers] == [MoELayer, MLP, MoELayer, MoELayer]
    assert dec.decoder.layers[1].mlp.linear_fc1.weight.shape == (2 * tc.intermediate_size, tc.hidden_size)
    hf = lm_state(bundle.model)
    back = mcore_to_hf([hf_to_mcore(hf, tc, 1, 0)], tc)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in hf
    mb = rows(bundle, 1)[0]
    with torch.no_grad(), recorded(dec) as route:
        hidden, _ = hf_forward(bundle.model, mb)
        mh, _ = mc_forward(bundle.model, dec, mb)
    assert (mh - hidden).abs().max() <= ATOL and sorted(route) == [0, 2, 3]


# ---------------------------------------------------------------- conversion (no process group needed)
def _shards(hf, tc, tp, ep):
    """shards[tp_rank][ep_rank]."""
    from training.mcore.convert import hf_to_mcore

    return [[hf_to_mcore(hf, tc, tp, r, ep=ep, ep_rank=e) for e in range(ep)] for r in range(tp)]


@pytest.fixture(scope="module")
def moe_state():
    model = tiny_moe().model
    return model, lm_state(model)


@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 2), (1, 4), (2, 2)])
def test_moe_round_trip_is_exact(moe_state, tp, ep):
    """HF -> (tp, ep) shards -> merge_ep -> HF: every key back, torch.equal, and the HF model loads it."""
    from training.mcore.convert import mcore_to_hf, merge_ep

    model, hf = moe_state
    tc = model.config.get_text_config()
    back = mcore_to_hf([merge_ep(s, tc) for s in _shards(hf, tc, tp, ep)], tc)
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), (tp, ep, k)
    missing, unexpected = copy.deepcopy(model).load_state_dict(back, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing)


def test_ep_split_layout(moe_state):
    """At ep=2 rank r holds experts 2r, 2r+1 as local_experts.0/1 (fc1 = HF's gate_up_proj[e] = [gate; up], fc2 =
    down_proj[e]) and the whole router; the attention and norms are the same on both ranks."""
    from training.mcore.convert import hf_to_mcore, mcore_to_hf

    model, hf = moe_state
    tc = model.config.get_text_config()
    p, q = "model.language_model.layers.2.mlp.", "decoder.layers.2.mlp."
    one = hf_to_mcore(hf, tc, 1, 0)
    for r in (0, 1):
        s = hf_to_mcore(hf, tc, 1, 0, ep=2, ep_rank=r)
        assert {k for k in s if k.startswith(q + "experts.")} == {
            q + f"experts.local_experts.{j}.linear_fc{n}.weight" for j in (0, 1) for n in (1, 2)}
        for j in (0, 1):
            e = 2 * r + j
            assert torch.equal(s[q + f"experts.local_experts.{j}.linear_fc1.weight"], hf[p + "experts.gate_up_proj"][e])
            assert torch.equal(s[q + f"experts.local_experts.{j}.linear_fc2.weight"], hf[p + "experts.down_proj"][e])
        assert torch.equal(s[q + "router.weight"], hf[p + "gate.weight"])
        assert all(torch.equal(s[k], one[k]) for k in s if ".experts." not in k)
    with pytest.raises(ValueError, match="merge the EP ranks first"):
        mcore_to_hf([hf_to_mcore(hf, tc, 1, 0, ep=2, ep_rank=0)], tc)


def test_reshard_ep(moe_state):
    """(tp2, ep2) -> (tp1, ep1) and (tp1, ep1) -> (tp1, ep2) / (tp1, ep4) equal converting directly."""
    from training.mcore.convert import reshard_ep

    model, hf = moe_state
    tc = model.config.get_text_config()

    def same(a, b):
        assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
        for x, y in zip(sum(a, []), sum(b, [])):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    one = _shards(hf, tc, 1, 1)
    same(reshard_ep(_shards(hf, tc, 2, 2), tc, 1, 1), one)
    same(reshard_ep(_shards(hf, tc, 1, 2), tc, 1, 1), one)
    same(reshard_ep(one, tc, 1, 2), _shards(hf, tc, 1, 2))
    same(reshard_ep(one, tc, 1, 4), _shards(hf, tc, 1, 4))


def test_moe_refusals(moe_state):
    from training.mcore.convert import hf_to_mcore
    from training.mcore.model import transformer_config

    model, hf = moe_state
    tc = model.config.get_text_config()
    cfg = transformer_config(tc, 1, expert_model_parallel_size=2)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.moe_layer_freq) == (4, 2, 128,
                                                                                                    [1, 1, 1, 1])
    assert cfg.moe_router_score_function == "softmax" and not cfg.moe_router_pre_softmax and cfg.moe_aux_loss_coeff == 0
    with pytest.raises(ValueError, match="the MoE decoder needs tp=1"):
        transformer_config(tc, 2)
    with pytest.raises(ValueError, match="expert-parallel size 3 must divide num_experts=4"):
        transformer_config(tc, 1, expert_model_parallel_size=3)
    with pytest.raises(ValueError, match="expert-parallel size 3 must divide num_experts=4"):
        hf_to_mcore(hf, tc, 1, 0, ep=3)
    with pytest.raises(ValueError, match="ep_rank 2 is not in 0..1"):
        hf_to_mcore(hf, tc, 1, 0, ep=2, ep_rank=2)


# ---------------------------------------------------------------- expert parallelism, one torchrun launch
@pytest.mark.slow  # ~30-60 s on 2 cores, most of it the two processes importing torch/transformers/megatron
def test_ep2_under_torchrun_equals_ep1():
    """EP=2 (gloo, 2 CPU processes, one packed row a rank; tests/dist/mcore_moe.py) against EP=1 on the same ranks
    and HF: the summed loss and every gradient by HF name; tokens cross to the other rank's experts; swapping the
    ranks' experts changes the loss."""
    from tests.conftest import REPO, clean_env

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(REPO / "tests" / "dist" / "mcore_moe.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**clean_env(), "CUDA_VISIBLE_DEVICES": ""})  # the CPU path, on any machine
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert done == ["ok ep1", "ok ep2", "ok ep2 crossing", "ok ep2 misassigned"], p.stdout
