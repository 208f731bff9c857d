"""Small numerics-bearing building blocks: norms, linear layers (plain or FP8 block-scaled), SwiGLU.

Rounding points follow the official reference (spec §2.2, §6.1): statistics and elementwise math in
fp32, one rounding to the compute dtype at the end; matmuls accumulate in fp32.

Official numerics (`official=True`, from `Config.official_numerics`): a linear whose weight is FP8 storage
runs as the official `linear()` does (spec §7.3): the activations are quantised per 128-block with UE8M0
scales (`act_quant`, from their bf16 value), and the FP8 GEMM multiplies those exact values by the
dequantised weight in fp32 (one rounding at the end). A plain (BF16) weight is a plain matmul, as in the
official code, whatever the mode.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dsjax import fp8

Weight = Any  # a jax.Array, or an FP8 leaf {"qweight": e4m3 [..., in, out], "scale": f32 [..., in/b, out/b]}


def weight(w: Weight, shape: tuple[int, ...] | None = None, dtype: Any = None) -> jax.Array:
    """Materialise a weight leaf: dequantise FP8 block-scaled storage, reshape, cast.

    FP8 leaves hold each matrix 2-D as [in, out] (the layout its 128x128 scale grid refers to); `shape`
    is the logical per-matrix shape (e.g. [H, dv, D] for wo) the dequantised matrix is viewed as.
    Plain arrays are already in their logical shape.
    """
    if isinstance(w, Mapping):
        w = fp8.dequantize_weight(w["qweight"], w["scale"], dtype or jnp.float32)
        if shape is not None:
            w = w.reshape(w.shape[:-2] + tuple(shape))
    return w if dtype is None else w.astype(dtype)


def is_fp8(w: Weight) -> bool:
    """Whether a weight leaf is FP8 block-scaled storage."""
    return isinstance(w, Mapping) and "qweight" in w


def quantize_activations(x: jax.Array) -> jax.Array:
    """What the official FP8 GEMM multiplies: x rounded to bf16, quantised per 128-block of the last axis
    with UE8M0 scales and dequantised (exactly) in f32. x: [..., K] -> f32 [..., K]."""
    q, s = fp8.act_quant(x.astype(jnp.bfloat16))
    return fp8.act_dequant(q, s, jnp.float32)


def fp8_linear(x: jax.Array, w: Weight, shape: tuple[int, ...] | None = None) -> jax.Array:
    """The official FP8 Linear (spec §7.3): act_quant(x), blockwise GEMM with fp32 accumulation, output in
    x.dtype. Equal to Σ_kb (Σ_k q_x q_w)·s_x·S_w up to fp32 summation order. x: [..., in] -> [..., *out]."""
    xq = quantize_activations(x)
    wf = weight(w, shape, jnp.float32)
    out = jax.lax.dot_general(xq, wf, (((x.ndim - 1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in fp32; one rounding to x.dtype. x: [..., D], w: [D]."""
    xf = x.astype(jnp.float32)
    r = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * r).astype(x.dtype)


def add_rms_norm(x: jax.Array, resid: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Fused residual add + RMSNorm (official form, spec §2.2).

    The norm sees the unrounded fp32 sum `x + resid`; the residual stream carries it rounded to
    x.dtype. Returns (normed [..., D], new_resid [..., D]).
    """
    s = x.astype(jnp.float32) + resid.astype(jnp.float32)
    r = s * jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * r).astype(x.dtype), s.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with bias in fp32 (the indexer's k_norm); one rounding to x.dtype."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, w: Weight, shape: tuple[int, ...] | None = None, *, official: bool = False) -> jax.Array:
    """x @ w over the last axis of x and the leading axis of w; fp32 accumulation, output in x.dtype.

    x: [..., in]; w: [in, *out] (or FP8 storage, reshaped to `shape`). Returns [..., *out].
    official: official numerics; an FP8 weight then runs as `fp8_linear` (activation quantisation).
    """
    if official and is_fp8(w):
        return fp8_linear(x, w, shape)
    w = weight(w, shape, x.dtype)
    out = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def dense_fp32(x: jax.Array, w: Weight, shape: tuple[int, ...] | None = None) -> jax.Array:
    """True fp32 matmul (router, indexer weights_proj, lm head): precision HIGHEST, fp32 output."""
    w = weight(w, shape, jnp.float32)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def swiglu(x: jax.Array, p: Mapping[str, Weight], official: bool = False) -> jax.Array:
    """down(silu(gate(x)) * up(x)); the elementwise product in fp32 with one rounding. x: [..., D].
    official: official numerics for FP8 weights (see `dense`)."""
    g = dense(x, p["gate"], official=official).astype(jnp.float32)
    u = dense(x, p["up"], official=official).astype(jnp.float32)
    z = (jax.nn.silu(g) * u).astype(x.dtype)
    return dense(z, p["down"], official=official)
