"""FP8 (e4m3) block formats of the official checkpoints and kernels (spec §7).

* Weights: e4m3 with one fp32 `weight_scale_inv` per 128x128 block; edge blocks may be partial.
* Activations (`act_quant`): per 128-block of the last axis, amax/448 rounded up to a power of two
  (UE8M0) so that `x / s` is exact and `q * s` is exactly representable in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128


def _expand_blocks(scale: jax.Array, rows: int, cols: int, block: int) -> jax.Array:
    """[..., ceil(rows/b), ceil(cols/b)] -> [..., rows, cols] (each scale covers its block; edges cropped)."""
    s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)
    return s[..., :rows, :cols]


def dequantize_weight(q: jax.Array, scale: jax.Array, dtype=jnp.float32, block: int = BLOCK) -> jax.Array:
    """Blockwise dequantisation W = fp32(q) * S[r // b, c // b]; q: [..., R, C], scale: [..., ceil(R/b), ceil(C/b)]."""
    rows, cols = q.shape[-2:]
    w = q.astype(jnp.float32) * _expand_blocks(scale.astype(jnp.float32), rows, cols, block)
    return w.astype(dtype)


def dequantize_weight_np(q: np.ndarray, scale: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Host (numpy) version of `dequantize_weight` for checkpoint conversion: fp32 [R, C]."""
    rows, cols = q.shape[-2:]
    s = np.repeat(np.repeat(np.asarray(scale, np.float32), block, axis=-2), block, axis=-1)[..., :rows, :cols]
    return q.astype(np.float32) * s


_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)  # every e4m3 bit pattern


def dequantize_weight_host(q: np.ndarray, scale: np.ndarray, block: int = BLOCK, dtype=np.float32) -> np.ndarray:
    """Same result as `dequantize_weight_np`, ~4x faster and with one full-size fp32 temporary, for
    checkpoint conversion: e4m3 decoded by a 256-entry table, each block row scaled in place.

    q: e4m3 [R, C]; scale: [ceil(R/b), ceil(C/b)] -> `dtype` [R, C].
    """
    w = _E4M3_TO_F32[np.asarray(q).view(np.uint8)]
    cols = w.shape[1]
    scale = np.asarray(scale, np.float32)
    for i in range(scale.shape[0]):
        w[i * block:(i + 1) * block] *= np.repeat(scale[i], block)[:cols]
    return w.astype(dtype, copy=False)


def quantize_weight(w: np.ndarray, block: int = BLOCK, pow2_scales: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Host-side block quantisation of a 2-D weight [R, C] into (e4m3 [R, C], fp32 scales [ceil(R/b), ceil(C/b)]).

    This is the official checkpoints' format (used by tests to build FP8 checkpoints, and by export).
    Edge blocks are scaled by their own amax, as if zero-padded to the full block.
    """
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = np.zeros((nr * block, nc * block), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nr, block, nc, block)
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4).astype(np.float32)
    scale = amax / np.float32(E4M3_MAX)
    if pow2_scales:
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:rows, :cols]
    q = np.clip(w / full, -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q, scale.astype(np.float32)


def ue8m0_scale(amax: jax.Array) -> jax.Array:
    """2^ceil(log2(amax * fp32(1/448))) computed exactly from the fp32 bits (spec §7.2)."""
    t = jnp.maximum(amax.astype(jnp.float32), 1e-4) * jnp.float32(1.0 / E4M3_MAX)
    bits = jax.lax.bitcast_convert_type(t, jnp.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(((exp + 127) << 23).astype(jnp.int32), jnp.float32)


def act_quant(x: jax.Array, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-block activation quantisation with UE8M0 scales.

    x: [..., D] with D a multiple of `block` (or D < block: one block) -> (e4m3 [..., D], f32 [..., D/block]).
    """
    d = x.shape[-1]
    b = min(block, d)
    if d % b:
        raise ValueError(f"act_quant needs the last dim ({d}) to be a multiple of the block ({b}).")
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (d // b, b))
    s = ue8m0_scale(jnp.max(jnp.abs(xb), axis=-1))
    q = jnp.clip(xb / s[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(x.shape), s


def act_dequant(q: jax.Array, s: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `act_quant`: q [..., D] e4m3, s [..., D/b] -> [..., D]."""
    d = q.shape[-1]
    nb = s.shape[-1]
    x = q.astype(jnp.float32).reshape(q.shape[:-1] + (nb, d // nb)) * s[..., None]
    return x.reshape(q.shape).astype(dtype)


def fp8_roundtrip(x: jax.Array, block: int = BLOCK) -> jax.Array:
    """Quantise then dequantise (the official latent-cache precision simulation, spec §4.6)."""
    q, s = act_quant(x, block)
    return act_dequant(q, s, x.dtype)
