"""Scan compiled HLO for buffers that grow quadratically with the sequence length (tests/test_memory_scaling.py).

`buffers(compiled)` lists every array an instruction of the optimised, post-layout module defines (name,
dtype, shape, elements); `profile(fn, make_args, lengths)` compiles `fn` for abstract inputs at each length
(nothing runs) and returns each length's largest buffers and temp bytes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax

# `%name = f32[2,256,8192]{2,1,0} op(...)`, and the element types of tuple-shaped results
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+[\w\-]+\(", re.M)
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")


def buffers(text: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(instruction, dtype, shape, elements) of every array an instruction defines in HLO text."""
    out = []
    for m in _DEF.finditer(text):
        name, types = m.group(1), m.group(2)
        for dt, dims in _ARRAY.findall(types):
            shape = tuple(int(d) for d in dims.split(",") if d)
            out.append((name, dt, shape, math.prod(shape)))
    return out


def profile(fn: Callable, make_args: Callable[[int], Sequence[Any]], lengths: Sequence[int]) -> dict[int, dict]:
    """Compile `fn(*make_args(L))` for each L: {L: {"temp": bytes, "largest": [(elements, dtype, shape, name)]}}."""
    out = {}
    for length in lengths:
        compiled = jax.jit(fn).lower(*make_args(length)).compile()
        bufs = sorted(((n, dt, s, name) for name, dt, s, n in buffers(compiled.as_text())), reverse=True)
        out[length] = {"temp": compiled.memory_analysis().temp_size_in_bytes, "largest": bufs[:8]}
    return out


def check_linear(prof: dict[int, dict], *, c: float = 0.5, growth: float = 2.1) -> None:
    """No buffer of >= c·L² elements at any length, and temp memory and the largest buffer grow at most
    `growth`x per doubling of L. Raises AssertionError naming the offending buffers."""
    lengths = sorted(prof)
    for length in lengths:
        big = [b for b in prof[length]["largest"] if b[0] >= c * length * length]
        assert not big, f"L={length}: buffers of >= {c}·L² elements: {big}"
    for a, b in zip(lengths, lengths[1:]):
        ratio = (prof[b]["temp"] / max(prof[a]["temp"], 1)) ** (math.log(2) / math.log(b / a))
        assert ratio <= growth, f"temp grows {ratio:.2f}x per doubling ({prof[a]['temp']} -> {prof[b]['temp']} B)"
        top = (prof[b]["largest"][0][0] / prof[a]["largest"][0][0]) ** (math.log(2) / math.log(b / a))
        assert top <= growth, f"largest buffer grows {top:.2f}x per doubling: {prof[a]['largest'][0]} -> " \
                              f"{prof[b]['largest'][0]}"
