"""The lightning indexer of DSA (spec §5): its projections and the top-k selection it feeds MLA.

    I[t, s] = Σ_h w[t, h] · ReLU(q_I[t, h] · k_I[s])          (h over index_n_heads)

q_I comes from the MLA query latent cQ, k_I from the attn-normed hidden state; both get half-split RoPE
on their first qk_rope_head_dim dims (rope first, nope last: the opposite of MLA). The softmax scale
Di^-1/2 and Hi^-1/2 are folded into w, which is positive-homogeneous-safe because ReLU(a·c) = c·ReLU(a)
for c > 0.

`indexer_numerics="bf16"` matches HF transformers (plain scores). `"official_fp8"` emulates the official
kernels (spec §5.3): Hadamard rotation (fp32 math, output rounded to the compute dtype), then FP8 e4m3
quantisation with one UE8M0 scale per (token, head) for q and per token for k, `weights_proj` in fp32.
The official kernel scores I = sk · Σ_h ReLU(q8·k8) · w' with w' = w·sq·Di^-1/2; since the scales are
positive powers of two, this equals Σ_h w·Di^-1/2·ReLU(q̂·k̂) on the dequantised vectors q̂ = q8·sq,
k̂ = k8·sk (exactly, up to fp32 summation order), and q̂, k̂ are exactly representable in bf16. So the
emulation hands the dequantised vectors to the ordinary score kernels. The indexer key cache of the
official code (132 B/token/layer for Di = 128) is `quantize_index_key` / `dequantize_index_key`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from dsjax import fp8
from dsjax.config import Config
from dsjax.layers import dense, dense_fp32, layer_norm, weight
from dsjax.rope import rope_halfsplit


def hadamard(x: jax.Array) -> jax.Array:
    """Orthonormal Sylvester Hadamard transform d^-1/2 · H_d x of the last axis (power-of-two d).

    As `fast_hadamard_transform` in the official code: the ±1 sums in fp32 (exact products), then one
    multiply by d^-1/2, one rounding to x.dtype.
    """
    d = x.shape[-1]
    h = np.array([[1.0]], np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    y = jnp.einsum("...d,ed->...e", x.astype(jnp.float32), jnp.asarray(h), precision=jax.lax.Precision.HIGHEST)
    return (y * np.float32(d ** -0.5)).astype(x.dtype)


def quantize_index_key(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The official indexer key cache format: k [..., Di] -> (e4m3 [..., Di], f32 UE8M0 scale [..., 1]).

    One block per vector (Di + 4 bytes per token and layer: 132 B at Di = 128). For a key produced by
    `project` under "official_fp8" the round trip is lossless: dequantize(quantize(k)) == k.
    """
    return fp8.act_quant(k, block=k.shape[-1])


def dequantize_index_key(k8: jax.Array, scale: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Inverse of `quantize_index_key`: (e4m3 [..., Di], f32 [..., 1]) -> [..., Di] in `dtype` (exact
    in bf16 and f32: an e4m3 value times a power of two has at most 4 significant bits)."""
    return fp8.act_dequant(k8, scale, dtype)


def _official_fp8(x: jax.Array) -> jax.Array:
    """Hadamard, then an FP8 round trip with one UE8M0 scale per vector (the official index numerics).

    The official code runs both on bf16 (the Hadamard output is rounded to bf16 before quantisation), so
    they do here whatever the compute dtype. x [..., Di] -> dequantised [..., Di] in x.dtype (exactly
    representable, so no second rounding)."""
    h = hadamard(x.astype(jnp.bfloat16))
    return dequantize_index_key(*quantize_index_key(h), dtype=x.dtype)


def project(p: Mapping[str, Any], x: jax.Array, cq: jax.Array, cos: jax.Array, sin: jax.Array,
            config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Indexer queries, head weights and keys.

    x: [B, T, D] (attn-normed hidden), cq: [B, T, q_lora_rank], cos/sin: [B, T, dr/2].
    Returns q [B, T, Hi, Di], w f32 [B, T, Hi] (scales folded in), k [B, T, Di].
    """
    c = config
    hi, di, dr = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
    off = c.official_numerics
    q = dense(cq, p["wq_b"], (c.q_lora_rank, hi, di), official=off)
    q = jnp.concatenate([rope_halfsplit(q[..., :dr], cos, sin), q[..., dr:]], axis=-1)
    k = layer_norm(dense(x, p["wk"], official=off), p["k_norm_scale"], p["k_norm_bias"], 1e-6)
    k = jnp.concatenate([rope_halfsplit(k[..., :dr], cos, sin), k[..., dr:]], axis=-1)
    w = dense_fp32(x, weight(p["weights_proj"])) * (hi ** -0.5 * di ** -0.5)
    if c.indexer_numerics == "official_fp8":
        q, k = _official_fp8(q), _official_fp8(k)
    return q, w, k


def select(q: jax.Array, w: jax.Array, k: jax.Array, *, config: Config, q_positions: jax.Array,
           k_positions: jax.Array | None = None, q_segment_ids: jax.Array | None = None,
           k_segment_ids: jax.Array | None = None) -> jax.Array:
    """Top-k visible keys per query -> int32 [B, T, min(index_topk, S)]; -1 marks unused slots."""
    return pallas_kernels.indexer_topk(
        q, w, k, topk=config.index_topk, q_positions=q_positions, k_positions=k_positions,
        q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, backend=config.indexer_backend,
        interpret=config.kernel_interpret)


def numerics_overlap(q: jax.Array, w: jax.Array, k: jax.Array, *, topk: int, q_positions: jax.Array,
                     k_positions: jax.Array | None = None, backend: str | None = None) -> jax.Array:
    """How much the official FP8 numerics change the selection: per-query Jaccard overlap |A∩B| / |A∪B| of
    the top-k sets of plain (HF, "bf16") scores and of official-FP8 scores of the same vectors.

    q [B, T, Hi, Di], w [B, T, Hi] (scales folded in), k [B, S, Di]: bf16-mode indexer outputs (before
    the Hadamard). Returns f32 [B, T] (1 for a query with no visible key).
    """
    kw = dict(topk=topk, q_positions=q_positions, k_positions=k_positions, backend=backend)
    a = pallas_kernels.indexer_topk(q, w, k, **kw)
    b = pallas_kernels.indexer_topk(_official_fp8(q), w, _official_fp8(k), **kw)
    # both lists hold distinct indices (-1 = unused), so |A∩B| counts the pairwise matches
    inter = jnp.sum((a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0), axis=(-1, -2))
    union = jnp.sum(a >= 0, -1) + jnp.sum(b >= 0, -1) - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
