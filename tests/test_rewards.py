"""Reward registry: each verifiable reward on right, wrong and malformed completions; user functions registered in
config with their declared options only; records that name code (import paths, unregistered names) are refused
before anything is imported or run."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

from reward_audit import crafted, evil_module, watching
from stages import rewards
from stages.rewards import RewardError, Rewards


def score(spec, completion, answer):
    return Rewards()(completion, {"key": "k", "reward": spec, "answer": answer})


def test_exact_match_ignores_case_space_final_stop_and_template_tokens():
    assert score("exact_match", "  Red.<|im_end|>", "red") == 1.0
    assert score("exact_match", "dark red", "red") == 0.0
    assert score("exact_match", r"so \boxed{blue}", "blue") == 1.0


def test_numeric_takes_the_last_number_within_tolerance():
    assert score("numeric", "There are 3 shapes.", 3) == 1.0
    assert score("numeric", "1 or 2? I say 2", "3") == 0.0
    assert score("numeric", "about 1,000.00004", 1000) == 1.0
    assert score({"name": "numeric", "abs_tol": 0.5, "rel_tol": 0.0}, "3.4", 3) == 1.0
    assert score({"name": "numeric", "abs_tol": 0.1, "rel_tol": 0.0}, "3.4", 3) == 0.0
    assert score("numeric", "no number here", 3) == 0.0


def test_choice_reads_the_option_letter():
    for text in ("B", "(B)", "B. because", "The answer is B", "Answer: (b)"):
        assert score("choice", text, "B") == 1.0, text
    for text in ("C", "Both are fine", ""):
        assert score("choice", text, "B") == 0.0, text


def test_box_iou_threshold():
    assert rewards.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert score("box_iou", '{"bbox_2d": [0, 0, 10, 10]}', [1, 0, 11, 10]) == 1.0  # IoU 0.82
    assert score({"name": "box_iou", "threshold": 0.9}, "[0, 0, 10, 10]", [1, 0, 11, 10]) == 0.0
    assert score("box_iou", "(0,0),(10,10)", [1, 0, 11, 10]) == 1.0  # Qwen2-VL form
    assert score("box_iou", "[0, 0, 10]", [0, 0, 10, 10]) == 0.0


def test_format_check():
    assert score("format", "<think>count them</think> 3<|im_end|>", None) == 1.0
    assert score("format", "3", None) == 0.0
    with pytest.raises(ValueError, match="pattern"):  # a record's regex could backtrack for hours
        score({"name": "format", "pattern": r"(a+)+$"}, "a" * 40 + "b", None)


def test_default_reward_applies_when_the_record_names_none():
    with pytest.raises(ValueError, match="names no reward"):
        Rewards()("x", {"key": "k", "answer": 1})
    assert Rewards(default="numeric")("1", {"key": "k", "answer": 1}) == 1.0
    assert Rewards(default="numeric")("1", {"key": "k", "answer": 1, "reward": None}) == 1.0  # as the packer's meta


# -- registry: data names keys, config registers code ---------------------------------------------------------
def test_user_rewards_are_registered_in_config_and_only_declared_options_pass():
    r = Rewards(registry={"short": "reward_helpers:short_enough"})
    meta = lambda spec: {"key": "k", "reward": spec, "answer": None}  # noqa: E731
    assert r("ab", meta("short")) == 1.0 and r("abcd", meta("short")) == 0.0
    assert r("abcd", meta({"name": "short", "limit": 5, "bonus": 0.5})) == 1.5  # declared options pass
    with pytest.raises(RewardError, match=r"'short' takes no option\(s\) \['extra'\]") as e:
        r("ab", meta({"name": "short", "extra": 1}))  # **extra in the signature does not open the door
    assert e.value.reason == "bad_reward_options"
    with pytest.raises(RewardError, match="not JSON scalars") as e:
        r("ab", meta({"name": "short", "limit": {"nested": 1}}))
    assert e.value.reason == "bad_reward_options"
    assert rewards.declared_options(rewards.numeric) == {"rel_tol", "abs_tol"}
    assert rewards.declared_options(rewards.exact_match) == frozenset()


def test_registry_and_default_reward_errors_name_the_key():
    with pytest.raises(ValueError, match="stage.objective.rewards.numeric: .*built-in"):
        Rewards(registry={"numeric": "reward_helpers:odd_length"})
    with pytest.raises(ValueError, match="stage.objective.rewards.mine='reward_helpers'.*package.module:function"):
        Rewards(registry={"mine": "reward_helpers"})
    with pytest.raises(ValueError, match="stage.objective.rewards.mine=.*cannot import"):
        Rewards(registry={"mine": "no_such_module_xyz:fn"})
    with pytest.raises(ValueError, match="stage.objective.rewards: 'a:b' is not a valid reward name"):
        Rewards(registry={"a:b": "reward_helpers:odd_length"})
    with pytest.raises(ValueError, match="stage.objective.default_reward='exact'.*not registered"):
        Rewards(default="exact")
    with pytest.raises(ValueError, match="stage.objective.default_reward='stages.rewards:numeric'.*import path"):
        Rewards(default="stages.rewards:numeric")
    assert Rewards(default="one", registry={"one": "reward_helpers:always_one"})("x", {"key": "k"}) == 1.0


def test_unknown_names_and_import_paths_are_refused_listing_the_registered_names():
    with pytest.raises(RewardError, match=r"'exact' is not registered; registered rewards: \['box_iou'.*"
                                          r"stage.objective.rewards") as e:
        score("exact", "x", 1)
    assert e.value.reason == "unknown_reward"
    with pytest.raises(RewardError, match="'stages.rewards:numeric' is an import path"):
        score("stages.rewards:numeric", "7", 7)
    with pytest.raises(RewardError, match="a mapping with a 'name' string"):
        score({"threshold": 0.5}, "x", 1)


@pytest.mark.parametrize("i", range(6))
def test_crafted_specs_are_refused_before_any_import_or_call(i, tmp_path, monkeypatch):
    module, marker = evil_module(tmp_path, f"evil_rewards_{i}")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = crafted(module)[i]
    r = Rewards()
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with watching(tmp_path) as events:
        with pytest.raises(RewardError) as e:
            r("1", {"key": "k", "reward": spec, "answer": 1})
    assert events == [] and imported == [], (events, imported)
    assert not os.path.exists(marker) and module not in sys.modules
    assert e.value.reason in ("unknown_reward", "bad_reward_options")


def test_the_audit_hook_does_see_an_import_with_a_side_effect(tmp_path, monkeypatch):
    """The control for the test above: the hook is live and would catch the import it guards against."""
    (module, marker), (other, _) = evil_module(tmp_path, "evil_control_a"), evil_module(tmp_path, "evil_control_b")
    monkeypatch.syspath_prepend(str(tmp_path))
    with watching() as events:
        importlib.import_module(module)  # runs the module's code: compile + exec events (no "import" event)
        __import__(other)  # the import statement's route: an "import" event
        eval("1 + 1")
    kinds = [e[0] for e in events]
    assert kinds.count("compile") == 3 and kinds.count("exec") == 3 and ("import", repr((other,))) in events
    assert ("open-for-write", marker) in events and os.path.exists(marker)
    sys.modules.pop(module), sys.modules.pop(other)
