"""The per-token tensors that attention exchanges: what a layer caches (Latents) and what its queries are
(Queries). Their own module so that attention, the KV cache, MTP and `sharding` all import them without
importing each other."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Latents(NamedTuple):
    """What one layer caches per token: the MLA latent, its rotary key, and the indexer key."""

    kv: jax.Array  # [B, S, kv_lora_rank]
    k_pe: jax.Array  # [B, S, qk_rope_head_dim]
    index_k: jax.Array | None  # [B, S, index_head_dim] (V3.2 only; `cache.IndexKey` in the FP8 cache)


class PackedLatents(NamedTuple):
    """The TPU kernels' native cache of one layer stack: latent and rotary key fused per token into one row
    of bf16 pairs in uint32 words (`pallas_kernels.latent_pack`), plus the indexer key."""

    rows: jax.Array  # uint32 [L, B, S, row_words] (row_words = 384 for V3.2)
    index_k: jax.Array | None  # [L, B, S, index_head_dim] (or `cache.IndexKey`)


class Queries(NamedTuple):
    """Per-token query-side tensors of one layer."""

    q_abs: jax.Array  # [B, T, H, kv_lora_rank]  (q_nope · W_UK)
    q_pe: jax.Array  # [B, T, H, qk_rope_head_dim]
    index_q: jax.Array | None  # [B, T, Hi, Di]
    index_w: jax.Array | None  # [B, T, Hi] f32
