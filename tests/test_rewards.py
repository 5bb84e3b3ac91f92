"""Reward registry: each verifiable reward on right, wrong and malformed completions; user functions by import
path; unknown names fail naming the name."""
from __future__ import annotations

import pytest

from stages import rewards
from stages.rewards import Rewards, resolve


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
    assert score({"name": "format", "pattern": r"\d+"}, "42", None) == 1.0


def test_user_function_by_import_path_and_unknown_names():
    assert resolve("stages.rewards:exact_match") is rewards.exact_match
    assert score("stages.rewards:numeric", "7", 7) == 1.0
    with pytest.raises(ValueError, match="'exact'"):
        resolve("exact")
    with pytest.raises(ValueError, match="no_such_module"):
        resolve("no_such_module:fn")
    with pytest.raises(ValueError, match="no 'reward'"):
        Rewards()("x", {"key": "k", "answer": 1})
    assert Rewards(default="numeric")("1", {"key": "k", "answer": 1}) == 1.0
