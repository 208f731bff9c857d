"""Rewards for RL: plain Python callables on the decoded completion, and the built-ins V3.2's RL uses for
verifiable tasks (spec §10.3): an exact-match answer, a format check and a length penalty.

A reward function takes (prompt text, completion text, example) and returns a float; `example` is the
dataset record the prompt came from (a dict, e.g. {"prompt": ..., "answer": ...}). `combine` sums weighted
rewards, `score` applies one to a batch of rollouts.

    reward = combine((exact_answer(r"answer: (\\S+)"), 1.0), (format_check(r"answer: \\S+$"), 0.1),
                     (length_penalty(max_chars=64), 1.0))
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[[str, str, Mapping[str, Any]], float]


def exact_answer(pattern: str | None = None, *, key: str = "answer", strip: bool = True) -> RewardFn:
    """1.0 when the completion's answer equals example[key], else 0.0. pattern: a regex whose first group
    is the answer (its first match in the completion); None: the whole completion."""
    rx = None if pattern is None else re.compile(pattern)

    def reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
        if key not in example:
            raise ValueError(f"exact_answer needs the example's {key!r} field; the example has {sorted(example)}.")
        if rx is None:
            got = completion
        else:
            m = rx.search(completion)
            if m is None:
                return 0.0
            got = m.group(1) if m.groups() else m.group(0)
        want = str(example[key])
        return float((got.strip() == want.strip()) if strip else (got == want))

    return reward


def format_check(pattern: str) -> RewardFn:
    """1.0 when the whole completion (stripped) matches the regex `pattern`, else 0.0."""
    rx = re.compile(pattern)
    return lambda prompt, completion, example: float(rx.fullmatch(completion.strip()) is not None)


def length_penalty(max_chars: int, *, per_char: float = 0.01) -> RewardFn:
    """−per_char for each character beyond max_chars (0 within it): V3.2's length penalty, linear."""
    if max_chars < 0 or per_char < 0:
        raise ValueError(f"length_penalty(max_chars={max_chars}, per_char={per_char}): both must be >= 0.")
    return lambda prompt, completion, example: -per_char * max(0, len(completion) - max_chars)


def combine(*weighted: tuple[RewardFn, float]) -> RewardFn:
    """Σ weight · reward over the (reward, weight) pairs."""
    if not weighted:
        raise ValueError("combine needs at least one (reward, weight) pair.")

    def reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
        return float(sum(w * fn(prompt, completion, example) for fn, w in weighted))

    return reward


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Rewards f32 [N] of N rollouts; a reward that is not a finite number is one clear ValueError."""
    if not len(prompts) == len(completions) == len(examples):
        raise ValueError(f"score: {len(prompts)} prompts, {len(completions)} completions and {len(examples)} "
                         "examples: give one of each per rollout.")
    out = np.empty(len(prompts), np.float32)
    for i, (p, c, e) in enumerate(zip(prompts, completions, examples)):
        r = fn(p, c, e)
        if not isinstance(r, (int, float, np.floating, np.integer)) or not np.isfinite(r):
            raise ValueError(f"reward function returned {r!r} for rollout {i}: rewards must be finite numbers.")
        out[i] = r
    return out
