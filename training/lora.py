"""LoRA through peft (`stage.lora`): low-rank adapters on chosen linear layers of chosen parameter groups.

Why: SFT, DPO and RL of 7B+ models on a few GPUs train adapters, not the full weights. peft injects its LoRA
layers into the HF model in place (`inject_adapter_in_model`), so parameter names keep their group prefixes
(training/models.py groups) and the engine, ZeRO and checkpoints see ordinary parameters; in a LoRA group only the
adapters train, the other groups of `stage.trainable` train fully as without LoRA. The `hf/` export merges the
adapters into the base weights with peft's own merge (`merge_and_unload`), so it loads with plain
`from_pretrained`; `stage.lora.save_adapter=true` also writes the adapter alone (`hf/adapter/`, peft's format).
A reference model (DPO, SAPO's KL) is the policy with its adapters switched off: the frozen base weights are the
starting weights (LoRA's B starts at zero), so no second copy is held.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    r: int = 0  # adapter rank; 0: no LoRA (the groups of stage.trainable train fully)
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # linear layers by their last name part
    groups: list = field(default_factory=lambda: ["llm"])  # groups trained by adapters (must be in stage.trainable)
    save_adapter: bool = False  # also write hf/adapter/ (the adapter alone, peft's format)


def check(cfg: LoraSettings, trainable: list, leaves=None) -> None:
    """`leaves`: the model's leaf groups (training/models.py), so that a LoRA group inside a trainable top-level
    group (lora.groups=[dense] with stage.trainable=[llm] on a MoE model) counts as trainable."""
    if not isinstance(cfg.r, int) or cfg.r < 0:
        raise ValueError(f"stage.lora.r={cfg.r} must be an integer >= 0 (0: no LoRA)")
    if not cfg.r:
        return
    if not (isinstance(cfg.alpha, (int, float)) and cfg.alpha > 0) or not 0 <= cfg.dropout < 1:
        raise ValueError(f"stage.lora: alpha={cfg.alpha} must be > 0 and dropout={cfg.dropout} in [0, 1)")
    if not cfg.targets:
        raise ValueError("stage.lora.targets is empty: name the linear layers to adapt, e.g. [q_proj,v_proj]")
    if leaves is None:
        outside = sorted(set(cfg.groups) - set(trainable))
    else:
        from training.models import leaf_groups

        on = set(leaf_groups(trainable, leaves))
        outside = sorted(g for g in cfg.groups if not set(leaf_groups([g], leaves, "stage.lora.groups")) <= on)
    if outside or not cfg.groups:
        raise ValueError(f"stage.lora.groups={list(cfg.groups)}: a LoRA group must be one of stage.trainable="
                         f"{list(trainable)} (adapters train in it, its base weights stay frozen)")


def _config(cfg: LoraSettings, modules: list[str]):
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=modules,
                           bias="none")


def target_modules(model: torch.nn.Module, family, cfg: LoraSettings) -> list[str]:
    """Full names of the nn.Linear modules to adapt: last name part in cfg.targets, inside a LoRA group (the
    group training/models.py assigns their parameters to; `llm` on a MoE model: its dense, router and experts
    leaves, of which only dense holds nn.Linear layers: the routers and the 3-D expert weights get no adapter)."""
    from training.models import group_of, leaf_groups

    wanted = set(leaf_groups(cfg.groups, family.leaf_groups, "stage.lora.groups"))
    out = [name for name, module in model.named_modules()
           if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets
           and group_of(name, family) in wanted]
    if not out:
        raise ValueError(f"stage.lora.targets={list(cfg.targets)} match no linear layer in groups "
                         f"{list(cfg.groups)} of {family.name}")
    return out


def inject(model: torch.nn.Module, family, cfg: LoraSettings) -> list[str]:
    """Adds the adapters in place (before the groups are listed); returns the adapted module names."""
    import peft

    modules = target_modules(model, family, cfg)
    peft.inject_adapter_in_model(_config(cfg, modules), model)
    model.lora_modules = modules  # what the export's merge re-creates
    return modules


def train_adapters_only(model: torch.nn.Module, groups: dict, cfg: LoraSettings) -> None:
    """After training.models.apply_trainable: in the LoRA groups only adapter parameters train."""
    from training.models import leaf_groups

    names = {n for g in leaf_groups(cfg.groups, groups, "stage.lora.groups") for n in groups[g]}
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(".lora_" in name)


class AdapterOff:
    """The policy step with its adapters switched off (peft's enable_adapters): the starting model, as a reference
    (DPO, SAPO's KL) that shares the policy's frozen base weights. Call it under torch.no_grad()."""

    def __init__(self, step):
        self.step = step

    def __call__(self, *args, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.step.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            return self.step(*args, **kwargs)
        finally:
            for m in layers:
                m.enable_adapters(True)  # makes the active adapter trainable again, as it was


def merged_state_dict(bundle, state_dict: dict, cfg: LoraSettings) -> tuple[dict, dict]:
    """(HF state dict with the adapters merged into their base weights, the adapter's own state dict): a fresh
    CPU copy of the model gets the same adapters and the trained weights, then peft merges and unloads them."""
    import peft

    fresh = bundle.family.model_cls._from_config(bundle.model.config, dtype=next(iter(state_dict.values())).dtype)
    tuner = peft.LoraModel(fresh, _config(cfg, bundle.model.lora_modules), "default")
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if not _tied(bundle.model, k)]:
        raise ValueError(f"LoRA export: the trained weights do not fit the adapted model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    adapter = peft.get_peft_model_state_dict(fresh)
    merged = tuner.merge_and_unload()
    return merged.state_dict(), adapter


def _tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def save_adapter(bundle, adapter: dict, cfg: LoraSettings, out: Path) -> None:
    """hf/adapter/: adapter_config.json + adapter_model.safetensors (load with peft's PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = _config(cfg, bundle.model.lora_modules)
    config.base_model_name_or_path = str(out.parent)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"))
