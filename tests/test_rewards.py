"""Reward functions for RL: the built-ins on hand-made completions, their combination, and clear errors."""

import numpy as np
import pytest

from dsjax.train import rewards as R


def test_exact_answer_format_and_length():
    ex = {"prompt": "12+30=", "answer": "42"}
    exact = R.exact_answer(r"answer: (\S+)")
    assert exact("", "so the answer: 42", ex) == 1.0
    assert exact("", "answer: 41", ex) == 0.0 and exact("", "no answer here", ex) == 0.0
    assert R.exact_answer()("", " 42 ", ex) == 1.0  # the whole completion, stripped
    fmt = R.format_check(r"answer: \d+")
    assert fmt("", "answer: 42\n", ex) == 1.0 and fmt("", "well, answer: 42", ex) == 0.0
    pen = R.length_penalty(max_chars=5, per_char=0.5)
    assert pen("", "abcde", ex) == 0.0 and pen("", "abcdefg", ex) == -1.0
    both = R.combine((exact, 1.0), (fmt, 0.5), (pen, 1.0))
    assert both("", "answer: 42", ex) == pytest.approx(1.0 + 0.5 - 0.5 * 5)
    got = R.score(both, ["p", "p"], ["answer: 42", "answer: 7"], [ex, ex])
    assert got.dtype == np.float32 and got.tolist() == pytest.approx([-1.0, 0.5 - 0.5 * 4])


def test_user_rewards_and_bad_input_are_clear():
    ex = {"prompt": "x", "answer": "y"}
    user = lambda p, c, e: float(c[::-1] == e["answer"])  # any Python callable on the decoded text
    assert R.score(user, ["x"], ["y"], [ex]).tolist() == [1.0]
    with pytest.raises(ValueError, match="rollout 0"):
        R.score(lambda p, c, e: float("nan"), ["x"], ["y"], [ex])
    with pytest.raises(ValueError, match="'answer' field"):
        R.exact_answer()("", "y", {"prompt": "x"})
    with pytest.raises(ValueError, match="one of each"):
        R.score(user, ["x"], [], [ex])
    with pytest.raises(ValueError, match=">= 0"):
        R.length_penalty(-1)
