"""The KV cache of MLA + DSA: per layer, the latent (kv_lora_rank), the rotary key (qk_rope_head_dim)
and the indexer key (index_head_dim), slot index = token position.

Layout: {"dense": Latents, "moe": Latents}, each leaf [L_stack, B, S_max, dim], matching the scanned stacks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.attention import Latents
from dsjax.config import Config


def init_cache(config: Config, batch: int, max_len: int, dtype=None) -> dict[str, Latents]:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    c = config
    dt = dtype or c.compute_dtype

    def lat(n: int) -> Latents:
        z = lambda d: jnp.zeros((n, batch, max_len, d), dt)
        return Latents(z(c.kv_lora_rank), z(c.qk_rope_head_dim), z(c.index_head_dim) if c.has_indexer else None)

    out = {}
    if c.n_dense_layers:
        out["dense"] = lat(c.n_dense_layers)
    if c.n_moe_layers:
        out["moe"] = lat(c.n_moe_layers)
    return out


def write(cache: Latents, new: Latents, positions: jax.Array) -> Latents:
    """Store the new tokens' latents at their positions (one layer).

    cache leaves [B, S, .], new leaves [B, T, .], positions [B, T]; positions < 0 (padding) are dropped.
    """
    s = cache.kv.shape[1]
    pos = jnp.where(positions >= 0, positions, s)

    def put(c, n):
        if c is None:
            return None
        return jax.vmap(lambda cb, nb, pb: cb.at[pb].set(nb.astype(cb.dtype), mode="drop"))(c, n, pos)

    return Latents(*(put(c, n) for c, n in zip(cache, new)))


def read(cache: Latents) -> Latents:
    """The cached latents as the attention ops consume them (one layer)."""
    return cache
