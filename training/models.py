"""Qwen-VL model family over the HF transformers classes: build, parameter groups, freezing, export.

Stages name parameter *groups* (vision, merger, llm), never parameter names. The groups are computed here
from each family's module tree, so a stage file works unchanged for every family and a parameter that
belongs to no group (a new module in a future transformers release) is an error, not silently frozen.

A family may split a top-level group into finer *leaf* groups (`SUBGROUPS`): the MoE family's llm is `dense`
(attention, norms, embeddings, lm_head, any dense MLP), `router` (the MoE gates) and `experts` (the routed
experts). Every parameter is in exactly one leaf; a stage names leaves or top-level groups (`llm` = all three),
and `leaf_groups` turns those names into leaves for freezing, the optimizer groups and LoRA alike.
"""
from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import training.attention  # noqa: F401 - registers attn_implementation="sdpa_varlen"
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

ASSETS = Path(__file__).parent / "assets"
GROUPS = ("vision", "merger", "llm")  # the top-level groups: every family has them, stage files name them
# top-level groups a family may split into these leaves (a MoE llm: its routers and routed experts apart)
SUBGROUPS = {"llm": ("dense", "router", "experts")}
PARENT = {leaf: g for g, leaves in SUBGROUPS.items() for leaf in leaves}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Family:
    """What differs between Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE, as data."""

    name: str
    model_cls: type
    config_cls: type
    patch_size: int
    image_mean: list
    image_std: list
    chat_template: str  # file under assets/chat_templates
    # module path prefixes of each leaf group, "*" standing for any one name part (layers.*.mlp.gate); the most
    # specific match (most name parts) wins, so a leaf can be carved out of a wider one (merger out of vision)
    group_prefixes: dict
    tiny_text: dict
    tiny_vision: dict

    def __post_init__(self):
        """A top-level group is one leaf or split into all of its SUBGROUPS, so `llm` always means the whole LLM."""
        leaves = set(self.group_prefixes)
        expected = {leaf for g in GROUPS for leaf in ((g,) if g in leaves else SUBGROUPS.get(g, (g,)))}
        if leaves != expected:
            raise ValueError(f"FAMILIES[{self.name!r}].group_prefixes has groups {sorted(leaves)}; each of {GROUPS} "
                             f"must be one group or split into all of {SUBGROUPS}")

    @property
    def model_type(self) -> str:
        return self.config_cls.model_type

    @property
    def leaf_groups(self) -> tuple:
        return tuple(self.group_prefixes)

    @property
    def moe(self) -> bool:
        """Routed experts in the LLM (the engines and the estimator that do not model them refuse the family)."""
        return "experts" in self.group_prefixes


_LLM = ["model.language_model", "lm_head"]
_QWEN3_VISION = {"vision": ["model.visual"], "merger": ["model.visual.merger", "model.visual.deepstack_merger_list"]}
_TINY_TEXT = dict(
    hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
)

_QWEN3_TINY_TEXT = dict(_TINY_TEXT, head_dim=32,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                         "mrope_section": [6, 5, 5], "mrope_interleaved": True})
_QWEN3_TINY_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=192,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                          num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3])

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        name="qwen2_vl", model_cls=Qwen2VLForConditionalGeneration, config_cls=Qwen2VLConfig,
        patch_size=14, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, chat_template="qwen2_vl.jinja",
        group_prefixes={"vision": ["model.visual"], "merger": ["model.visual.merger"], "llm": _LLM},
        tiny_text=dict(_TINY_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [4, 6, 6]}),
        tiny_vision=dict(depth=4, embed_dim=64, hidden_size=192, mlp_ratio=2, num_heads=4,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    ),
    "qwen2_5_vl": Family(
        name="qwen2_5_vl", model_cls=Qwen2_5_VLForConditionalGeneration, config_cls=Qwen2_5_VLConfig,
        patch_size=14, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, chat_template="qwen2_vl.jinja",
        group_prefixes={"vision": ["model.visual"], "merger": ["model.visual.merger"], "llm": _LLM},
        tiny_text=dict(_TINY_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [4, 6, 6]}),
        # window 56 px = 4x4 patches, so a 112 px image has 4 windows; blocks 1 and 3 use full attention
        tiny_vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=192,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                         fullatt_block_indexes=[1, 3], tokens_per_second=2),
    ),
    "qwen3_vl": Family(
        name="qwen3_vl", model_cls=Qwen3VLForConditionalGeneration, config_cls=Qwen3VLConfig,
        patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], chat_template="qwen3_vl.jinja",
        group_prefixes={**_QWEN3_VISION, "llm": _LLM},
        tiny_text=_QWEN3_TINY_TEXT,
        tiny_vision=_QWEN3_TINY_VISION,
    ),
    # Qwen3-VL-30B-A3B / 235B-A22B: Qwen3-VL's ViT, processor and chat template; every decoder MLP a sparse MoE
    # block (mlp.gate: the router [E, H]; mlp.experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] as 3-D
    # parameters), except the layers in mlp_only_layers or off decoder_sparse_step, which keep a dense MLP (dense)
    "qwen3_vl_moe": Family(
        name="qwen3_vl_moe", model_cls=Qwen3VLMoeForConditionalGeneration, config_cls=Qwen3VLMoeConfig,
        patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], chat_template="qwen3_vl.jinja",
        group_prefixes={**_QWEN3_VISION, "dense": _LLM,
                        "router": ["model.language_model.layers.*.mlp.gate"],
                        "experts": ["model.language_model.layers.*.mlp.experts"]},
        # the tiny qwen3_vl text shapes; 4 experts of moe_intermediate 128, top-2, every layer sparse (~2.5M
        # parameters); the text config's own tie_word_embeddings defaults to True, so it is set here too
        tiny_text=dict(_QWEN3_TINY_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                       decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
        tiny_vision=_QWEN3_TINY_VISION,
    ),
}


@dataclass
class ModelConfig:
    """`model=` config group. `path` set: load a real HF checkpoint; unset: random init of the tiny preset."""

    name: str = "tiny_qwen3_vl"
    family: str = "qwen3_vl"
    path: Optional[str] = None
    init_seed: int = 0
    dtype: str = "float32"  # parameters as loaded; the engine config decides bf16 training
    attn_implementation: str = "sdpa_varlen"  # training/attention.py: packed rows by cu_seqlens, no L x L mask
    gradient_checkpointing: bool = False  # per decoder layer and per ViT block (HF's own checkpointing)
    offload_activations: bool = False  # tensors saved for backward (with checkpointing: layer inputs) in host memory
    tiled_mlp: int = 0  # decoder MLPs run in this many sequence shards (DeepSpeed TiledMLP); 0/1: off
    loss_chunk: int = 0  # tokens per lm_head chunk of the loss (training/vlm.py); 0: fp32 logits of ~256 MiB a chunk
    min_pixels: int = 56 * 56
    max_pixels: int = 128 * 128
    extra: dict = field(default_factory=dict)  # extra kwargs for from_pretrained
    # the tiny preset's architecture changed: {text: {...}, vision: {...}} over the family's tiny_text/tiny_vision
    tiny: dict = field(default_factory=dict)
    # {path: an hf/ export, groups: [vision, ...]}: those groups' weights taken from it (e.g. a smaller student
    # starting with its teacher's ViT); every parameter of the groups must be there with the same shape
    groups_from: dict = field(default_factory=lambda: {"path": None, "groups": []})


@dataclass
class Bundle:
    """A model with the tokenizer and image processor that belong to it."""

    family: Family
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def tiny_tokenizer(family: Family) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))
    tok.chat_template = (ASSETS / "chat_templates" / family.chat_template).read_text()
    return tok


def tiny_config(family: Family, tokenizer: PreTrainedTokenizerBase, changes: Optional[dict] = None):
    """The family's tiny HF config; `changes` (model.tiny): {text: {...}, vision: {...}} over its tiny presets."""
    changes = dict(changes or {})
    unknown = sorted(set(changes) - {"text", "vision"})
    if unknown:
        raise ValueError(f"model.tiny has unknown part(s) {unknown}; use model.tiny.text / model.tiny.vision")
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = dict(family.tiny_text, **dict(changes.get("text") or {}), vocab_size=len(tokenizer), **ids, **special)
    return family.config_cls(text_config=text, vision_config=dict(family.tiny_vision, **dict(changes.get("vision") or {})),
                             tie_word_embeddings=False, **ids, **special)


def _check_hf_dir(path: Path, family: Family) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model.path={str(path)!r} is not a Hugging Face model directory (no config.json there). "
            f"Point model.path at a local copy of a {family.name} checkpoint, or at a previous stage's hf/ export.")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != family.model_type:
        hint = next((f"model={n}" for n, f in FAMILIES.items() if f.model_type == model_type), "another family")
        raise ValueError(
            f"model.path={str(path)!r} holds a {model_type!r} checkpoint but model.family is {family.name!r} "
            f"(expects {family.model_type!r}); use {hint} or point model.path at a {family.name} checkpoint.")


def _training_checkpoint(path: Path) -> Optional[Path]:
    """The step directory when `path` is a stage's output dir, its checkpoints/ dir or one step dir; else None."""
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    from training.engines import megatron

    return path if path.name.startswith("step_") and (any(path.glob("*model_states.pt")) or
                                                       megatron.is_checkpoint(path)) else None


def _build_from_checkpoint(cfg: ModelConfig, step_dir: Path) -> Bundle:
    """A stage's training checkpoint as the next stage's start: the architecture of the run that wrote it
    (its config.yaml), its weights, and (by construction) no optimizer state."""
    import yaml

    run_dir = step_dir.parent.parent
    conf = run_dir / "config.yaml"
    if not conf.is_file():
        raise ValueError(f"model.path={cfg.path!r} is a training checkpoint but {conf} is missing, so its model "
                         f"architecture is unknown; point model.path at that stage's hf/ export instead")
    prev = yaml.safe_load(conf.read_text())["model"]
    if prev["family"] != cfg.family:
        raise ValueError(f"model.path={cfg.path!r} was trained as {prev['family']!r} but model.family is "
                         f"{cfg.family!r}; use model=tiny_{prev['family']} or model={prev['family']}")
    bundle = build(ModelConfig(**{**prev, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation,
                                  "gradient_checkpointing": cfg.gradient_checkpointing,
                                  "loss_chunk": cfg.loss_chunk}))
    from training.engine import checkpoint_weights

    missing, unexpected = bundle.model.load_state_dict(checkpoint_weights(step_dir), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not fit its own model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return bundle


def build(cfg: ModelConfig) -> Bundle:
    """The tiny preset from its config (seeded), a real HF checkpoint, or a previous stage's training checkpoint."""
    if cfg.path is not None and (step_dir := _training_checkpoint(Path(cfg.path))) is not None:
        return _build_from_checkpoint(cfg, step_dir)
    if cfg.path is not None and not (Path(cfg.path) / "config.json").is_file() \
            and (Path(cfg.path) / "hf" / "config.json").is_file():  # a stage's output dir with no checkpoint
        cfg = dataclasses.replace(cfg, path=str(Path(cfg.path) / "hf"))
    family = get_family(cfg.family)
    dtype = getattr(torch, cfg.dtype)
    if cfg.path is None:
        tokenizer = tiny_tokenizer(family)
        # fork_rng: the init seed must not disturb the training RNG stream (or depend on it)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = family.model_cls._from_config(tiny_config(family, tokenizer, cfg.tiny),
                                                  attn_implementation=cfg.attn_implementation, dtype=dtype)
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=family.patch_size, temporal_patch_size=2, merge_size=2, image_mean=family.image_mean,
            image_std=family.image_std, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    else:
        path = Path(cfg.path)
        _check_hf_dir(path, family)
        model = family.model_cls.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                 **cfg.extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = (ASSETS / "chat_templates" / family.chat_template).read_text()
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if (cfg.groups_from or {}).get("path") or (cfg.groups_from or {}).get("groups"):
        _load_groups(model, family, dict(cfg.groups_from))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Bundle(family, model, tokenizer, image_processor)


def _load_groups(model: torch.nn.Module, family: Family, spec: dict) -> None:
    """model.groups_from: the named groups' parameters copied from an hf/ export's safetensors (shapes checked)."""
    from safetensors import safe_open

    unknown = sorted(set(spec) - {"path", "groups"})
    if unknown or not spec.get("path") or not spec.get("groups"):
        raise ValueError(f"model.groups_from={spec}: give {{path: <hf dir>, groups: [vision, ...]}}")
    wanted = set(leaf_groups(spec["groups"], family.leaf_groups, "model.groups_from.groups"))
    files = sorted(Path(spec["path"]).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.groups_from.path={spec['path']!r} holds no *.safetensors")
    params = {n: p for n, p in model.named_parameters() if group_of(n, family) in wanted}
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # export keys are the parameter names (transformers 5)
                if key in params:
                    found[key] = st.get_tensor(key)
    missing = sorted(set(params) - set(found))
    bad = sorted(n for n, t in found.items() if t.shape != params[n].shape)
    if missing or bad:
        raise ValueError(f"model.groups_from: {spec['path']} lacks {missing[:3]} or has other shapes for {bad[:3]} "
                         f"of groups {sorted(wanted)}; the groups' architecture must match")
    with torch.no_grad():
        for n, t in found.items():
            params[n].copy_(t.to(params[n].dtype))


def group_of(name: str, family: Family) -> str | None:
    """The leaf group of a parameter or module name: its most specific matching group prefix (the merger inside
    the ViT is its own group, a router inside the llm too), None for none."""
    parts = name.split(".")
    best = None
    for group, prefixes in family.group_prefixes.items():
        for prefix in prefixes:
            want = prefix.split(".")
            if len(want) <= len(parts) and all(w in ("*", p) for w, p in zip(want, parts)):
                if best is None or len(want) > best[0]:
                    best = (len(want), group)
    return best[1] if best else None


def group_names(leaves) -> list[str]:
    """Every name a stage may use for a model whose leaf groups are `leaves` (a Family's leaf_groups or a
    param_groups dict): the leaves, and each top-level group that is split into them."""
    leaves = list(leaves)
    split = [g for g, subs in SUBGROUPS.items() if all(s in leaves for s in subs)]
    return [g for g in GROUPS if g in leaves or g in split] + [g for g in leaves if g not in GROUPS]


def describe_groups(leaves) -> str:
    """The valid names for error messages, saying what a split group stands for."""
    leaves = list(leaves)
    parts = [f"{g} = {' + '.join(SUBGROUPS[g])}" for g in group_names(leaves) if g in SUBGROUPS and g not in leaves]
    return f"{group_names(leaves)}" + (f" ({'; '.join(parts)})" if parts else "")


def leaf_groups(names, leaves, key: str = "stage.trainable") -> list[str]:
    """The leaf groups that group names stand for (`llm` on a MoE model: dense, router and experts), in the
    model's order; an unknown name (`router` on a dense model) raises a ValueError naming `key` and the valid
    names. The one place names are resolved: freezing, the optimizer groups, LoRA and model.groups_from use it."""
    leaves = list(leaves)
    unknown = sorted(set(names) - set(group_names(leaves)))
    if unknown:
        raise ValueError(f"{key} names unknown group(s) {unknown}; groups are {describe_groups(leaves)}")
    want = {leaf for n in names for leaf in ((n,) if n in leaves else SUBGROUPS[n])}
    return [g for g in leaves if g in want]


def lr_mult_of(leaf: str, lr_mult: dict) -> tuple[str, float]:
    """(the name whose multiplier applies, the multiplier) of a leaf group: its own entry in stage.lr_mult, else
    its top-level group's (lr_mult.llm covers dense, router and experts unless they have their own), else 1."""
    for name in (leaf, PARENT.get(leaf)):
        if name is not None and name in lr_mult:
            return name, float(lr_mult[name])
    return leaf, 1.0


def param_groups(model: torch.nn.Module, family: Family) -> dict[str, list[str]]:
    """Parameter names per leaf group (for the dense families: vision, merger, llm); every parameter lands in
    exactly one group or this raises."""
    groups: dict[str, list[str]] = {g: [] for g in family.leaf_groups}
    for name, _ in model.named_parameters():
        group = group_of(name, family)
        if group is None:
            raise ValueError(f"parameter {name!r} of {family.name} belongs to no group; "
                             f"extend FAMILIES[{family.name!r}].group_prefixes in training/models.py")
        groups[group].append(name)
    return groups


def apply_trainable(model: torch.nn.Module, groups: dict[str, list[str]], trainable: list[str]) -> None:
    """Freezing comes from the stage's group list only (leaf or top-level names, resolved by `leaf_groups`)."""
    on = {n for g in leaf_groups(trainable, groups) for n in groups[g]}
    for name, p in model.named_parameters():
        p.requires_grad_(name in on)


def export_hf(bundle: Bundle, state_dict: dict, out: Path) -> None:
    """Writes an HF directory (config, safetensors, tokenizer with chat template, image processor)."""
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    if set(dict(model.named_parameters())) - set(state_dict):  # an engine replaced modules (megatron's decoder)
        with torch.device("meta"):  # save_pretrained walks the HF modules (MoE: to re-split fused experts)
            model = bundle.family.model_cls(model.config)
    # a copy: save_pretrained renames checkpoint keys in the dict it is given
    model.save_pretrained(out, state_dict=dict(state_dict), safe_serialization=True)
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
