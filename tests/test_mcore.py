"""training/mcore: the Qwen-VL text decoder on megatron-core against the HF model, and the weight conversion.

- the megatron Decoder's final hidden states and logits equal HF's `last_hidden_state` / `lm_head` (1e-5, float32)
  for the three tiny families on a packed row (image, text and video samples cut by cu_seqlens, the real 3-D
  M-RoPE ids, DeepStack for Qwen3-VL) and on right-padded rows with an attention mask; bf16 within bf16 round-off;
- the gradients of one scalar of the logits (embedding, every layer, head; untied and tied), converted back to HF
  names, equal HF's (the pad id's embedding row included: HF's padding_idx);
- HF -> megatron -> HF is bit-exact at tp=1 and tp=2 (tied, and one key/value head, too); tp=2 -> tp=1
  resharding equals converting at tp=1 directly; the tp=2 shards hold the documented slices;
- tensor parallelism: TP=2 under torchrun (gloo, CPU) equals the one-process HF model (tests/dist/mcore_tp.py);
- configurations the decoder does not implement are refused by name.
The in-process decoder tests run on CPU only (training/mcore/shim.py); they skip on CUDA machines.
The helpers `tiny` / `packed_case` / `hf_forward` / `mc_forward` are shared with tests/dist/mcore_tp.py.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from data.pack import PackConfig, collate
from test_packing import image_sample, text_sample, video_sample
from training.models import ModelConfig, build
from training.vlm import VLM

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
ATOL = 1e-5  # max abs, hidden states and logits
GRAD_RTOL = 1e-5  # per tensor, |g_mcore - g_hf| / |g_hf|


# ---------------------------------------------------------------- shared with tests/dist/mcore_tp.py
def tiny(family: str, tied: bool = False, kv_heads: int | None = None):
    """The tiny HF model (eval: no dropout anyway), its lm_head tied to the embedding if asked, with another
    number of key/value heads if asked (the preset has 6 query heads, 2 key/value heads)."""
    text = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    bundle = build(ModelConfig(name=f"tiny_{family}", family=family, tiny={"text": text}))
    bundle.model.eval()
    if tied:
        bundle.model.lm_head.weight = bundle.model.model.language_model.embed_tokens.weight
    return bundle


def _visual(bundle, batch, ids) -> tuple[dict, dict]:
    """The ViT features (no grad: the decoder is under test) and the DeepStack kwargs of the merged row."""
    vlm = VLM(bundle.model)
    with torch.no_grad():
        feats, _ = vlm.encode_visual(batch)
        _, deepstack = vlm.merge(ids, bundle.model.get_input_embeddings()(ids), feats)
    return feats, deepstack


def packed_case(bundle) -> dict:
    """One packed row as training/vlm.py feeds HF's decoder (data/pack.py varlen_inputs): an image, a text and a
    video sample of different lengths flattened into [1, N] with cu_seqlens and their real M-RoPE ids."""
    samples = [image_sample(bundle, 0), text_sample(bundle, 1), video_sample(bundle, 2, t=2)]
    cfg = PackConfig(seq_len=sum(len(s["input_ids"]) for s in samples), buffer_size=4,
                     pad_id=bundle.tokenizer.pad_token_id, attention="varlen")
    packer = cfg.build()
    batch = collate([r for s in samples for r in packer.add(s)] + packer.flush(), cfg)
    B, L = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(1, B * L)
    feats, deepstack = _visual(bundle, batch, ids)
    hf_kwargs = VLM(bundle.model).decoder_inputs(batch, ids, None, packed=True)
    return dict(ids=ids, feats=feats, deepstack=deepstack, hf=hf_kwargs, valid=torch.ones_like(ids, dtype=torch.bool),
                mc=dict(position_ids=hf_kwargs["position_ids"], cu_seqlens=batch["cu_seqlens"]))


def padded_case(bundle) -> dict:
    """Three right-padded rows (image, text, image: visual tokens in two rows, so DeepStack's order over rows
    counts) with a [B, L] attention mask and HF's own M-RoPE ids for them (`compute_3d_position_ids`, as
    training/vlm.py does for rollout rows)."""
    samples = [image_sample(bundle, 0), text_sample(bundle, 1), image_sample(bundle, 3)]
    B, L = len(samples), max(len(s["input_ids"]) for s in samples)
    ids = torch.full((B, L), bundle.tokenizer.pad_token_id)
    mm, mask = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n] = s["input_ids"], 1
        if "mm_token_type_ids" in s:
            mm[i, :n] = s["mm_token_type_ids"]
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                 **{k: torch.cat([s[k] for s in samples if k in s]) for k in ("pixel_values", "image_grid_thw")})
    feats, deepstack = _visual(bundle, batch, ids)
    with torch.no_grad():
        hf_kwargs = VLM(bundle.model).decoder_inputs(batch, ids, bundle.model.get_input_embeddings()(ids), False)
    return dict(ids=ids, feats=feats, deepstack=deepstack, hf=hf_kwargs, valid=mask.bool(),
                mc=dict(position_ids=hf_kwargs["position_ids"], attention_mask=mask))


def hf_forward(model, case) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state, logits) of the HF text model + lm_head, embedding included (so it gets gradients)."""
    embeds, _ = VLM(model).merge(case["ids"], model.get_input_embeddings()(case["ids"]), case["feats"])
    hidden = model.model.language_model(input_ids=None, inputs_embeds=embeds, use_cache=False, **case["hf"],
                                        **case["deepstack"]).last_hidden_state
    return hidden, model.lm_head(hidden)


def mc_forward(model, dec, case) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states, this rank's padded-vocab logit shard) of the megatron Decoder on the same inputs."""
    embeds, _ = VLM(model).merge(case["ids"], dec.embed(case["ids"]), case["feats"])
    hidden = dec(embeds, **case["mc"], **case["deepstack"])
    return hidden, dec.logits(hidden)


def logit_weights(case, vocab: int) -> torch.Tensor:
    """Fixed random weights of a scalar loss sum(logits * w) over the valid positions."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(*case["ids"].shape, vocab, generator=g) * case["valid"][..., None]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lm_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}


# ---------------------------------------------------------------- in-process tests (tp=1)
@pytest.fixture(scope="module")
def parallel():
    """megatron's parallel state at tp=1 on a one-process gloo group (or the session's group), torn down after.
    The Decoder runs on CPU here through training/mcore/shim.py, which stays off where CUDA is available (the
    GPU path, Transformer Engine's spec, is not written yet): skipped there; the torchrun test hides the GPUs."""
    from training.mcore import shim

    if torch.cuda.is_available():
        pytest.skip("CPU decoder tests: training/mcore/shim.py is off on CUDA machines")
    created = shim.init_model_parallel(1)
    yield
    shim.destroy(created)


def _decoder(bundle, tied=False):
    from training.mcore.convert import hf_to_mcore
    from training.mcore.model import Decoder

    tc = bundle.model.config.get_text_config()
    dec = Decoder(tc, tied=tied)
    dec.load(hf_to_mcore(bundle.model.state_dict(), tc, tp=1, rank=0))
    return dec


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_equals_hf(parallel, family):
    """Packed row (with DeepStack for Qwen3-VL) and padded rows: hidden states and logits within 1e-5."""
    bundle = tiny(family)
    dec = _decoder(bundle)
    vocab = bundle.model.config.get_text_config().vocab_size
    for case in (packed_case(bundle), padded_case(bundle)):
        if family == "qwen3_vl":
            assert len(case["deepstack"]["deepstack_visual_embeds"]) == 3
        pos = case["mc"]["position_ids"]
        assert not torch.equal(pos[0], pos[1]) and not torch.equal(pos[1], pos[2])  # real 3-D ids, image spans
        with torch.no_grad():
            hidden, logits = hf_forward(bundle.model, case)
            mh, ml = mc_forward(bundle.model, dec, case)
        v = case["valid"]
        assert (mh - hidden)[v].abs().max() <= ATOL
        assert (ml[..., :vocab] - logits)[v].abs().max() <= ATOL
        assert (ml[..., vocab:] == 0).all()  # the padded vocabulary's logits
    # flash-attention's varlen_inputs give 4 rows (text positions on top, which HF and the Decoder drop)
    four = dict(case, mc=dict(case["mc"], position_ids=torch.cat([torch.zeros_like(pos[:1]), pos])))
    with torch.no_grad():
        assert torch.equal(mc_forward(bundle.model, dec, four)[0], mh)


def test_bf16_is_close_to_hf_bf16(parallel):
    """params_dtype=bf16 (the norms cast too): the packed row within bf16 round-off of HF's bf16 model."""
    from training.mcore.convert import hf_to_mcore
    from training.mcore.model import Decoder, transformer_config

    bundle = tiny("qwen3_vl")
    model = bundle.model.to(torch.bfloat16)
    tc = model.config.get_text_config()
    dec = Decoder(tc, config=transformer_config(tc, 1, torch.bfloat16))
    dec.load(hf_to_mcore(model.state_dict(), tc, 1, 0))
    assert {p.dtype for p in dec.parameters()} == {torch.bfloat16}
    case = packed_case(bundle)
    case["feats"] = {k: (f.bfloat16(), [x.bfloat16() for x in ds]) for k, (f, ds) in case["feats"].items()}
    case["deepstack"]["deepstack_visual_embeds"] = [x.bfloat16() for x in case["deepstack"]["deepstack_visual_embeds"]]
    with torch.no_grad():
        hidden, _ = hf_forward(model, case)
        mh, _ = mc_forward(model, dec, case)
    assert mh.dtype == torch.bfloat16 and relative_error(mh.float(), hidden.float()) <= 2e-2


def test_shim_is_idempotent_and_leaves_the_cpu_rng_alone(parallel):
    """apply() twice patches once; a training-mode forward (attention dropout runs inside megatron's RNG-tracker
    fork, which swaps the CPU generator's state on CPU) leaves the caller's CPU RNG stream where it was."""
    from training.mcore import shim

    patched = torch.cuda.current_device
    shim.apply()
    assert torch.cuda.current_device is patched and torch.cuda.current_device() == "cpu"
    bundle = tiny("qwen2_vl")
    dec = _decoder(bundle).train()
    case = packed_case(bundle)
    state = torch.get_rng_state()
    mc_forward(bundle.model, dec, case)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("family,tied", [(f, False) for f in FAMILIES] + [("qwen3_vl", True)])
def test_gradients_equal_hf(parallel, family, tied):
    """The gradient of sum(logits * w) on the packed row, for every decoder weight, converted back to HF names."""
    from training.mcore.convert import mcore_to_hf

    bundle = tiny(family, tied)
    dec = _decoder(bundle, tied)
    tc = bundle.model.config.get_text_config()
    case = packed_case(bundle)
    w = logit_weights(case, tc.vocab_size)
    (hf_forward(bundle.model, case)[1] * w).sum().backward()
    (mc_forward(bundle.model, dec, case)[1][..., :tc.vocab_size] * w).sum().backward()
    grads = mcore_to_hf([{k: p.grad for k, p in dec.named_parameters()}], tc)
    hf_grads = {k: p.grad for k, p in bundle.model.named_parameters() if p.grad is not None}
    assert set(hf_grads) == set(grads) - ({"lm_head.weight"} if tied else set())
    for k, g in hf_grads.items():
        assert relative_error(grads[k], g) <= GRAD_RTOL, k


def test_embedding_lookup_of_pad_ids_has_no_gradient(parallel):
    """As HF's nn.Embedding(padding_idx=pad_token_id): the pad row gets no gradient from its lookups."""
    bundle = tiny("qwen2_5_vl")
    dec = _decoder(bundle)
    pad = bundle.tokenizer.pad_token_id
    dec.embed(torch.tensor([[pad, pad + 1]])).sum().backward()
    g = dec.embedding.word_embeddings.weight.grad
    assert (g[pad] == 0).all() and (g[pad + 1] == 1).all()


# ---------------------------------------------------------------- conversion (no process group needed)
@pytest.mark.parametrize("family,tied,kv_heads", [(f, False, None) for f in FAMILIES]
                         + [("qwen2_vl", True, None), ("qwen3_vl", False, 1)])
def test_round_trip_is_exact(family, tied, kv_heads):
    """HF -> megatron (tp=1, tp=2) -> HF: every key back, torch.equal, and the HF model loads it."""
    from training.mcore.convert import hf_to_mcore, mcore_to_hf, padded_vocab_size

    model = tiny(family, tied, kv_heads).model
    tc = model.config.get_text_config()
    hf = lm_state(model)
    for tp in (1, 2):
        shards = [hf_to_mcore(hf, tc, tp, r) for r in range(tp)]
        assert ("output_layer.weight" in shards[0]) != tied
        assert shards[0]["embedding.word_embeddings.weight"].shape[0] == padded_vocab_size(tc.vocab_size, tp) // tp
        back = mcore_to_hf(shards, tc)
        assert back.keys() == hf.keys()
        for k in hf:
            assert torch.equal(back[k], hf[k]), (tp, k)
        missing, unexpected = copy.deepcopy(model).load_state_dict(back, strict=False)
        assert not unexpected and all(k.startswith("model.visual.") for k in missing)


def test_tp_split_layout():
    """At tp=2 each rank holds one whole query group of linear_qkv ([3 q heads; k; v] of group r), its heads'
    o_proj columns, [gate_r; up_r] and its vocabulary rows."""
    from training.mcore.convert import hf_to_mcore

    model = tiny("qwen2_5_vl").model
    tc = model.config.get_text_config()
    hf = lm_state(model)
    p, hd = "model.language_model.layers.1.", 32
    for r in (0, 1):
        s = hf_to_mcore(hf, tc, 2, r)
        q, k, v = (hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv")
        want = torch.cat([q[r * 3 * hd:(r + 1) * 3 * hd], k[r * hd:(r + 1) * hd], v[r * hd:(r + 1) * hd]])
        assert torch.equal(s["decoder.layers.1.self_attention.linear_qkv.bias"], want)
        assert torch.equal(s["decoder.layers.1.self_attention.linear_proj.weight"],
                           hf[p + "self_attn.o_proj.weight"][:, r * 96:(r + 1) * 96])
        gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
        assert torch.equal(s["decoder.layers.1.mlp.linear_fc1.weight"],
                           torch.cat([gate[r * 256:(r + 1) * 256], up[r * 256:(r + 1) * 256]]))
        emb = s["embedding.word_embeddings.weight"]  # 573 -> 768 rows, 384 a rank
        full = hf["model.language_model.embed_tokens.weight"]
        assert torch.equal(emb[:573 - 384] if r else emb, full[384:] if r else full[:384])
        assert not r or (emb[573 - 384:] == 0).all()


@pytest.mark.parametrize("tied", [False, True])
def test_reshard_tp2_to_tp1(tied):
    from training.mcore.convert import hf_to_mcore, reshard

    model = tiny("qwen3_vl", tied).model
    tc = model.config.get_text_config()
    hf = lm_state(model)
    one = hf_to_mcore(hf, tc, 1, 0)
    (back,) = reshard([hf_to_mcore(hf, tc, 2, r) for r in range(2)], tc, 1)
    assert back.keys() == one.keys() and all(torch.equal(back[k], one[k]) for k in one)
    two = reshard([one], tc, 2)
    assert all(torch.equal(two[r][k], hf_to_mcore(hf, tc, 2, r)[k]) for r in range(2) for k in one)


def test_unsupported_configs_are_refused():
    from training.mcore.model import transformer_config

    tc = tiny("qwen2_vl").model.config.get_text_config()
    assert transformer_config(tc, 2).num_query_groups == 2

    def refused(match, tp=1, **changes):
        bad = copy.deepcopy(tc)
        for k, v in changes.items():
            setattr(bad, k, v)
        with pytest.raises(ValueError, match=match):
            transformer_config(bad, tp)

    refused("tensor-parallel size 4 must divide num_attention_heads=6 and either divide num_key_value_heads=2", tp=4)
    refused("tensor-parallel size 3 must divide", tp=3)  # divides the 6 heads, neither divides nor is a multiple of 2
    refused("rope_type='yarn'", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    refused("mrope_section", rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 7]})
    refused("sliding window", use_sliding_window=True)
    refused("sliding window", layer_types=["full_attention", "sliding_attention"] * 2)
    refused("hidden_act='gelu'", hidden_act="gelu")
    refused("model_type='qwen3_vl_moe_text'", model_type="qwen3_vl_moe_text")


# ---------------------------------------------------------------- tensor parallelism, one torchrun launch
@pytest.mark.slow  # ~20-30 s on 2 cores, nearly all of it the two processes importing torch/transformers/megatron
def test_tp2_under_torchrun_equals_hf():
    """TP=2 (gloo, 2 CPU processes): hidden states, gathered logits and every gradient (the two ranks' converted
    back to HF names) equal the one-process HF model, per family, for tied embeddings, and with one key/value
    head (tp > groups: megatron replicates it over the ranks)."""
    from tests.conftest import REPO, clean_env

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(REPO / "tests" / "dist" / "mcore_tp.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**clean_env(), "CUDA_VISIBLE_DEVICES": ""})  # the CPU path, on any machine
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == 5, p.stdout
