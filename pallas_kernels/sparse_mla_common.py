"""Input preparation shared by the sparse MLA kernels (TPU and GPU), and the split-K combine.

Both kernels walk a query's top-k list in chunks of `block_k` slots. The wrappers here
  * pad the slot axis to a multiple of `block_k` with unused (-1) slots, so no kernel reads past the end
    of the index row (and K need not be a multiple of the block);
  * map indices that cannot be dereferenced (< 0 or >= S) to -1, so a kernel never reads out of bounds;
  * count, per query, the chunks up to the last valid slot (`n_chunks [B, T]`), so the kernels stop early
    for the early tokens of a prefill (t < k) and for short decode contexts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG = -1e30  # finite "-inf" for running maxima: exp2(NEG - NEG) never occurs on a masked score


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, D] . b [N, D]^T -> f32 [M, N] (inside kernels: lowers to one MXU / tensor-core matmul)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, N] . b [N, D] -> f32 [M, D]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [N, M]^T . b [N, D] -> f32 [M, D]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, n: int, value=0) -> jax.Array:
    """Pads `axis` of x at the end to length n."""
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def prepare_indices(indices: jax.Array, s_len: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Sanitised, padded indices and per-query chunk counts.

    indices: int [B, T, K] (< 0 unused). Returns (int32 [B, T, Kp] with Kp = K rounded up to block_k,
    every entry in [0, S) or -1; int32 [B, T] = number of block_k chunks up to the last valid slot).
    """
    idx = indices.astype(jnp.int32)
    idx = jnp.where((idx >= 0) & (idx < s_len), idx, -1)
    k = idx.shape[-1]
    idx = pad_axis(idx, 2, round_up(k, block_k), -1)
    slot = jnp.arange(k, dtype=jnp.int32)
    last = jnp.max(jnp.where(idx[..., :k] >= 0, slot, -1), axis=-1)  # -1 when no valid slot
    n_chunks = (last + block_k) // block_k  # = cdiv(last + 1, block_k); 0 for an empty row
    return idx, n_chunks.astype(jnp.int32)


def finish_lse(lse: jax.Array) -> jax.Array:
    """Kernels write log(0) = -inf for a query without valid slots; the public convention is +inf."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse)


def combine_splits(out: jax.Array, lse: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Merges split-K partial results normalised per split.

    out f32 [..., n_split (at `axis`), ..., D], lse f32 (same without D; -inf for an empty split)
    -> (out [... without the split axis ..., D], lse with -inf for an all-empty query).
    """
    mx = jnp.max(lse, axis=axis, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp(lse - mx)  # 0 for empty splits
    tot = jnp.sum(w, axis=axis)
    o = jnp.sum(out * jnp.expand_dims(w, -1), axis=axis) / jnp.expand_dims(jnp.where(tot > 0, tot, 1.0), -1)
    return o, jnp.squeeze(mx, axis) + jnp.log(tot)


def flops(b: int, t: int, h: int, k: int, dc: int, dr: int, backward: bool = False) -> int:
    """Matmul FLOPs with every slot valid (FlashMLA's count): forward S = Q.K^T (Dc + Dr) and O = P.V (Dc);
    backward recomputes S and adds dP = dO.V^T, dQ = dS.K, dK = dS^T.Q (Dc + Dr each) and dV = P^T.dO."""
    per_slot = 3 * (dc + dr) + 2 * dc if backward else (dc + dr) + dc
    return 2 * b * t * h * k * per_slot


def cost_estimate(b: int, t: int, h: int, k: int, dc: int, dr: int, itemsize: int, *, gathers: int = 1,
                  backward: bool = False) -> pl.CostEstimate:
    """For XLA's scheduler: FLOPs, exps and HBM bytes (every slot gathered `gathers` times per query,
    e.g. once per head block on GPU; the backward also writes f32 dK/dV rows)."""
    rows = b * t * k * gathers * (dc + dr) * itemsize
    q_io = b * t * h * (dc + dr + dc) * itemsize * (2 if backward else 1)
    dkv = b * t * k * gathers * (dc + dr) * 4 if backward else 0
    return pl.CostEstimate(flops=flops(b, t, h, k, dc, dr, backward), transcendentals=b * t * h * k,
                           bytes_accessed=rows + q_io + dkv)
