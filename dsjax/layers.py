"""Small numerics-bearing building blocks: norms, linear layers (plain or FP8 block-scaled), SwiGLU.

Rounding points follow the official reference (spec §2.2, §6.1): statistics and elementwise math in
fp32, one rounding to the compute dtype at the end; matmuls accumulate in fp32.
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


def dense(x: jax.Array, w: Weight, shape: tuple[int, ...] | None = None) -> jax.Array:
    """x @ w over the last axis of x and the leading axis of w; fp32 accumulation, output in x.dtype.

    x: [..., in]; w: [in, *out] (or FP8 storage, reshaped to `shape`). Returns [..., *out].
    """
    w = weight(w, shape, x.dtype)
    out = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def dense_fp32(x: jax.Array, w: Weight, shape: tuple[int, ...] | None = None) -> jax.Array:
    """True fp32 matmul (router, indexer weights_proj, lm head): precision HIGHEST, fp32 output."""
    w = weight(w, shape, jnp.float32)
    return jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def swiglu(x: jax.Array, p: Mapping[str, Weight]) -> jax.Array:
    """down(silu(gate(x)) * up(x)); the elementwise product in fp32 with one rounding. x: [..., D]."""
    g = dense(x, p["gate"]).astype(jnp.float32)
    u = dense(x, p["up"]).astype(jnp.float32)
    z = (jax.nn.silu(g) * u).astype(x.dtype)
    return dense(z, p["down"])
