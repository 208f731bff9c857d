"""YaRN rotary embeddings and the two rotation layouts (spec §3).

The inverse-frequency table is computed on the host in numpy: XLA rewrites division by a broadcast
constant into a reciprocal multiply, which changes some table entries by one ulp (spec §12.21). Only the
angle `fp32(position) * freq` (one fp32 product, as the reference does) is computed in the graph.

MLA rotates the last `qk_rope_head_dim` dims of q and k in the *interleaved* layout (pairs 2j, 2j+1);
the lightning indexer rotates its first `qk_rope_head_dim` dims in the *half-split* layout (pairs j, j+d/2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import Config, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, base: float, factor: float | None, orig_max_pos: int | None,
              beta_fast: float, beta_slow: float) -> np.ndarray:
    # base^(2j/d) in float64 then rounded: matches PyTorch's float32 pow for these inputs (spec §12.22).
    pos_freqs = (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    extrap = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if factor is None:
        return extrap
    interp = (extrap / np.float32(factor)).astype(np.float32)  # official: (1/p)/s
    low = max(math.floor(_correction_dim(beta_fast, dim, base, orig_max_pos)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, orig_max_pos)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    smooth = (np.float32(1) - ramp).astype(np.float32)
    out = interp * (np.float32(1) - smooth) + extrap * smooth
    return out.astype(np.float32)


def inv_freq(config: Config) -> np.ndarray:
    """The `qk_rope_head_dim // 2` YaRN inverse frequencies, float32, computed on the host."""
    rs = config.rope_scaling
    if rs is None:
        return _inv_freq(config.qk_rope_head_dim, float(config.rope_theta), None, None, 32.0, 1.0)
    return _inv_freq(config.qk_rope_head_dim, float(config.rope_theta), float(rs.factor),
                     int(rs.original_max_position_embeddings), float(rs.beta_fast), float(rs.beta_slow))


def cos_sin_scale(config: Config) -> float:
    """HF's YaRN `attention_factor` on cos/sin: mscale(s, mscale)/mscale(s, mscale_all_dim); 1.0 when equal."""
    rs = config.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def cos_sin(config: Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer `positions` [...] -> two float32 arrays [..., qk_rope_head_dim // 2]."""
    freqs = jnp.asarray(inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * freqs
    scale = cos_sin_scale(config)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by angle j; output stays interleaved (official layout).

    x: [B, T, ..., d]; cos, sin: [B, T, d/2] (broadcast over the middle axes). Math in fp32, one rounding.
    """
    xf = x.astype(jnp.float32)
    c, s = _bcast(cos, x), _bcast(sin, x)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    y = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return y.reshape(x.shape).astype(x.dtype)


def rope_halfsplit(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (x[j], x[j + d/2]) by angle j (GPT-NeoX "rotate_half"; the indexer's layout).

    x: [B, T, ..., d]; cos, sin: [B, T, d/2]. Math in fp32, one rounding.
    """
    xf = x.astype(jnp.float32)
    c, s = _bcast(cos, x), _bcast(sin, x)
    h = x.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    """[B, T, d/2] -> [B, T, 1, ..., d/2] to broadcast against x [B, T, ..., d]."""
    extra = x.ndim - t.ndim
    return t.reshape(t.shape[:-1] + (1,) * extra + t.shape[-1:])
