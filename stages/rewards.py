"""Verifiable rewards for RL prompts, named by the record's `reward` field.

A reward function maps (completion text, the record's `answer`, keyword options) to a float. The record names
it either as a string (`"numeric"`, or `"pkg.mod:fn"` for a user function) or as a mapping with options
(`{"name": "box_iou", "threshold": 0.7}`). Names are resolved once per name and cached; an unknown name is a
ValueError that names it, so a typo fails on the first prompt instead of silently training on zero reward.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable

RewardFn = Callable[..., float]

_SPECIAL = re.compile(r"<\|[a-z_]+\|>")  # chat-template tokens such as <|im_end|> left in decoded text
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def clean(text: str) -> str:
    """The completion without special tokens and surrounding whitespace."""
    return _SPECIAL.sub("", text).strip()


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", clean(text)).strip().strip(".").strip().casefold()


def _boxed(text: str) -> str:
    """The content of the last \\boxed{...} if there is one (math answers), else the text."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else text


def exact_match(completion: str, answer: Any, **_) -> float:
    """1 if the completion equals the answer up to case, whitespace and a final full stop."""
    return float(_norm(_boxed(completion)) == _norm(str(answer)))


def numeric(completion: str, answer: Any, rel_tol: float = 1e-4, abs_tol: float = 1e-6, **_) -> float:
    """1 if the last number in the completion (or its \\boxed{}) equals the answer within tolerance."""
    found = _NUMBER.findall(_boxed(clean(completion)).replace(",", ""))
    if not found:
        return 0.0
    try:
        return float(math.isclose(float(found[-1]), float(answer), rel_tol=rel_tol, abs_tol=abs_tol))
    except ValueError:
        return 0.0


def choice(completion: str, answer: Any, **_) -> float:
    """1 if the chosen option letter (A-Z, as 'B', '(B)', 'B.', 'Answer: B') is the answer's letter."""
    text = clean(completion)
    m = (re.search(r"answer\s*(?:is)?\s*[:：]?\s*\(?([A-Z])\b", text, re.I)
         or re.match(r"^\(?([A-Z])(?:[).:\s]|$)", text))
    return float(bool(m) and m.group(1).upper() == str(answer).strip().strip("()").upper())


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box(text: str) -> list[float] | None:
    """The first [x1, y1, x2, y2] list (Qwen2.5/3-VL JSON), else the first four free-standing numbers (Qwen2-VL's
    (x1,y1),(x2,y2)); digits inside names such as bbox_2d do not count."""
    for inner in re.findall(r"\[([^\[\]]*)\]", text):
        nums = _NUMBER.findall(inner)
        if len(nums) >= 4:
            return [float(x) for x in nums[:4]]
    nums = re.findall(r"(?<![A-Za-z_\d.])" + _NUMBER.pattern, text)
    return [float(x) for x in nums[:4]] if len(nums) >= 4 else None


def box_iou(completion: str, answer: Any, threshold: float = 0.5, **_) -> float:
    """1 if the completion's box [x1,y1,x2,y2] has IoU >= threshold with the answer box."""
    nums = _box(clean(completion))
    if nums is None:
        return 0.0
    return float(iou(nums, [float(x) for x in answer]) >= threshold)


def format_check(completion: str, answer: Any = None, pattern: str = r"(?s)^<think>.*</think>.*\S", **_) -> float:
    """1 if the whole completion matches `pattern` (default: a think block followed by an answer)."""
    return float(re.fullmatch(pattern, clean(completion)) is not None)


REGISTRY: dict[str, RewardFn] = {
    "exact_match": exact_match, "numeric": numeric, "choice": choice, "box_iou": box_iou,
    "format": format_check,
}


def _import(path: str) -> RewardFn:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {path!r}: cannot import it ({e}); a user reward is named 'package.module:function'"
                         ) from None
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn


def resolve(name: str) -> RewardFn:
    """The function for a reward name: a registry key or 'pkg.mod:fn'."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        return _import(name)
    raise ValueError(f"reward {name!r} is unknown; use one of {sorted(REGISTRY)} or a user function "
                     f"'package.module:function'")


class Rewards:
    """Scores completions by each prompt's own `reward` spec; resolved functions are cached by name."""

    def __init__(self, default: str | None = None):
        self.default = default
        self._cache: dict[str, RewardFn] = {}

    def spec(self, meta: dict) -> tuple[str, dict]:
        spec = meta.get("reward", self.default)
        if spec is None:
            raise ValueError(f"RL sample {meta.get('key', '?')} has no 'reward' field and "
                             f"stage.objective.default_reward is unset; name a reward in the record or the config")
        if isinstance(spec, dict):
            opts = dict(spec)
            name = opts.pop("name", None)
            if name is None:
                raise ValueError(f"RL sample {meta.get('key', '?')}: reward mapping {spec} has no 'name'")
            return name, opts
        return str(spec), {}

    def check(self, meta: dict) -> None:
        """Raises now if the prompt's reward cannot be resolved (before any generation is spent on it)."""
        name, _ = self.spec(meta)
        if name not in self._cache:
            self._cache[name] = resolve(name)

    def __call__(self, completion: str, meta: dict) -> float:
        name, opts = self.spec(meta)
        self.check(meta)
        return float(self._cache[name](completion, meta.get("answer"), **opts))
