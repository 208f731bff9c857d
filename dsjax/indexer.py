"""The lightning indexer of DSA (spec §5): its projections and the top-k selection it feeds MLA.

    I[t, s] = Σ_h w[t, h] · ReLU(q_I[t, h] · k_I[s])          (h over index_n_heads)

q_I comes from the MLA query latent cQ, k_I from the attn-normed hidden state; both get half-split RoPE
on their first qk_rope_head_dim dims (rope first, nope last: the opposite of MLA). The softmax scale
Di^-1/2 and Hi^-1/2 are folded into w, which is positive-homogeneous-safe because ReLU(a·c) = c·ReLU(a)
for c > 0.

`indexer_numerics="bf16"` matches HF transformers (plain scores). `"official_fp8"` emulates the official
kernels: Hadamard rotation then FP8 e4m3 quantisation with UE8M0 scales of q (per token and head) and
k (per token); the emulated key is exactly representable, so the kernels score it like any other key.
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
    """Orthonormal Sylvester Hadamard transform of the last axis (power-of-two size), fp32 math."""
    d = x.shape[-1]
    h = np.array([[1.0]], np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    h = jnp.asarray(h / np.sqrt(d), jnp.float32)
    return jnp.einsum("...d,ed->...e", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def _official_fp8(x: jax.Array) -> jax.Array:
    """Hadamard, then an FP8 round trip with one UE8M0 scale per vector (the official index numerics)."""
    x = hadamard(x)
    return fp8.fp8_roundtrip(x.astype(jnp.float32), block=x.shape[-1])


def project(p: Mapping[str, Any], x: jax.Array, cq: jax.Array, cos: jax.Array, sin: jax.Array,
            config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Indexer queries, head weights and keys.

    x: [B, T, D] (attn-normed hidden), cq: [B, T, q_lora_rank], cos/sin: [B, T, dr/2].
    Returns q [B, T, Hi, Di], w f32 [B, T, Hi] (scales folded in), k [B, T, Di].
    """
    c = config
    hi, di, dr = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
    q = dense(cq, p["wq_b"], (c.q_lora_rank, hi, di))
    q = jnp.concatenate([rope_halfsplit(q[..., :dr], cos, sin), q[..., dr:]], axis=-1)
    k = layer_norm(dense(x, p["wk"]), p["k_norm_scale"], p["k_norm_bias"], 1e-6)
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
