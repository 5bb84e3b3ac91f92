"""Verifiable rewards for RL prompts, named by the record's `reward` field.

A reward function maps (completion text, the record's `answer`, keyword options) to a float. Data never chooses
code: a record may only name a registered reward, a built-in (`REGISTRY`) or one the config registers
(`stage.objective.rewards: {my_reward: "pkg.mod:fn"}`, imported once when the objective is built), as a string
(`"numeric"`) or as a mapping with options (`{"name": "box_iou", "threshold": 0.7}`). Options must be JSON values
and named parameters of the function. A record naming an import path ('module:function'), an unregistered
name or an undeclared option is refused before anything is imported or called (shards come from third parties:
`subprocess:run` with options would run a shell). Config names may not shadow built-ins, so a built-in name
always means the built-in function.
"""
from __future__ import annotations

import importlib
import inspect
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


_THINK = re.compile(r"(?s)^<think>.*</think>.*\S")


def format_check(completion: str, answer: Any = None, **_) -> float:
    """1 if the completion is a think block followed by an answer. The pattern is fixed, not a record option: a
    regex from a shard could backtrack for hours; register a function in config for another format."""
    return float(_THINK.fullmatch(clean(completion)) is not None)


REGISTRY: dict[str, RewardFn] = {
    "exact_match": exact_match, "numeric": numeric, "choice": choice, "box_iou": box_iou,
    "format": format_check,
}


REGISTER_HINT = ("register a trusted function in the config: stage.objective.rewards: "
                 "{my_reward: 'package.module:function'}, then name 'my_reward' in the records")


class RewardError(ValueError):
    """A reward spec that names no registered reward (`reason` unknown_reward) or bad options
    (bad_reward_options); the data loader turns it into a skipped sample of that reason."""

    def __init__(self, reason: str, msg: str):
        self.reason = reason
        super().__init__(msg)


def _import(path: str, name: str) -> RewardFn:
    """A config-registered user function (the config is trusted; data never reaches here)."""
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"stage.objective.rewards.{name}={path!r}: cannot import it ({e}); give the function as "
                         f"'package.module:function' importable from the training process") from None
    if not callable(fn):
        raise ValueError(f"stage.objective.rewards.{name}={path!r} is not callable")
    return fn


def declared_options(fn: RewardFn) -> frozenset[str]:
    """The option names a record may pass: named parameters after (completion, answer). **kwargs accepts none,
    so a record cannot reach a keyword the function does not name (e.g. subprocess.run's `executable`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some C functions): no options
        return frozenset()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]} | {"completion", "answer"}
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in skip)


def _json_value(v) -> bool:
    return v is None or isinstance(v, (str, bool, int, float)) or (isinstance(v, list) and all(map(_json_value, v)))


def check_spec(spec, registered: dict, hint: str = REGISTER_HINT) -> tuple[str, dict]:
    """(name, options) of a record's reward spec, checked against `registered` (name -> declared option names,
    or None where the options are not known here). Pure: imports and calls nothing. Raises RewardError."""
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("name", None)
    else:
        name, opts = spec, {}
    if not isinstance(name, str) or not name:
        raise RewardError("unknown_reward", f"reward {spec!r:.120} is not a name or a mapping with a 'name' string; "
                                            f"registered rewards: {sorted(registered)}")
    if ":" in name:
        raise RewardError("unknown_reward", f"reward {name!r} is an import path; records may only name a registered "
                                            f"reward ({sorted(registered)}); {hint}")
    if name not in registered:
        raise RewardError("unknown_reward", f"reward {name!r} is not registered; registered rewards: "
                                            f"{sorted(registered)}; {hint}")
    bad = {k: v for k, v in opts.items() if not _json_value(v)}
    if bad:
        raise RewardError("bad_reward_options", f"reward {name!r}: options {sorted(bad)} are not JSON scalars or "
                                                f"lists of them")
    allowed = registered[name]
    if allowed is not None and set(opts) - allowed:
        raise RewardError("bad_reward_options", f"reward {name!r} takes no option(s) {sorted(set(opts) - allowed)}; "
                                                f"its options are {sorted(allowed) or 'none'}")
    return name, opts


class Rewards:
    """Scores completions by each prompt's own `reward` spec, which may only name a built-in or a reward of
    `registry` ({name: 'pkg.mod:fn' or a function}, imported here, once)."""

    def __init__(self, default: str | None = None, registry: dict | None = None):
        self.fns: dict[str, RewardFn] = dict(REGISTRY)
        for name, fn in (registry or {}).items():
            if name in REGISTRY:
                raise ValueError(f"stage.objective.rewards.{name}: {name!r} is a built-in reward and cannot be "
                                 f"overridden; register your function under another name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", name):
                raise ValueError(f"stage.objective.rewards: {name!r} is not a valid reward name (letters, digits, "
                                 f"_ . -; no ':')")
            if isinstance(fn, str):
                if ":" not in fn:
                    raise ValueError(f"stage.objective.rewards.{name}={fn!r}: give the function as "
                                     f"'package.module:function'")
                fn = _import(fn, name)
            elif not callable(fn):
                raise ValueError(f"stage.objective.rewards.{name}: {fn!r} is not a function or "
                                 f"'package.module:function'")
            self.fns[name] = fn
        self.options = {n: declared_options(f) for n, f in self.fns.items()}
        self.default = default
        if default is not None:
            try:
                check_spec(default, self.options)
            except RewardError as e:
                raise ValueError(f"stage.objective.default_reward={default!r}: {e}") from None

    def spec(self, meta: dict) -> tuple[str, dict]:
        """(name, options) of a prompt's reward (its record's, else the default); RewardError if unusable."""
        spec = meta.get("reward")
        if spec is None:
            spec = self.default
        if spec is None:
            raise RewardError("unknown_reward", "the record names no reward and stage.objective.default_reward is "
                                                f"unset; name one of {sorted(self.fns)} in the record or the config")
        return check_spec(spec, self.options)

    def check(self, meta: dict) -> tuple[str, dict]:
        """`spec`, its RewardError (a ValueError) naming the sample: raised before any generation is spent."""
        try:
            return self.spec(meta)
        except RewardError as e:
            raise RewardError(e.reason, f"RL sample {meta.get('key', '?')!r}: {e}") from None

    def __call__(self, completion: str, meta: dict) -> float:
        name, opts = self.check(meta)
        return float(self.fns[name](completion, meta.get("answer"), **opts))
