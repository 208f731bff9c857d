"""The KV cache of MLA + DSA: per layer, the latent (kv_lora_rank), the rotary key (qk_rope_head_dim)
and the indexer key (index_head_dim), slot index = token position; plus each sequence's length.

Layout (a plain dict pytree):

    {"dense":   Latents,        leaves [L_dense, B, S_max, dim]   (matching the scanned stacks)
     "moe":     Latents,        leaves [L_moe,   B, S_max, dim]
     "mtp":     Latents,        leaves [B, S_max, dim]             (only with `mtp=True`: the MTP block)
     "lengths": int32 [B]}      tokens written so far per sequence (= the next write position)

Slots past a sequence's length may hold stale latents (a rejected speculative draft, right padding): they
are never visible, because a key is visible only at k_pos <= q_pos and each sequence writes its slots in
order, overwriting position p before any query at p reads it.

Size per token per layer (bf16; `bytes_per_token` computes it for any config):

    latent 512·2 + rope key 64·2 = 1152 B (spec §4.3, as the official demo caches it)
    + indexer key 128·2           =  256 B (spec §5.5/§13: HF's bf16 index-key cache)
                                  = 1408 B for V3.2, 1152 B for V3 (no indexer).

The official kernels keep the index key as FP8 e4m3 plus one fp32 scale (128 + 4 = 132 B, spec §5.5).
That storage needs `dsjax.indexer.quantize_index_key`, which is not in this build, so the key is cached
in the compute dtype; with `indexer_numerics="official_fp8"` the cached value is already the FP8-emulated
key, so selection is unaffected, only the storage is 2x larger.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsjax.attention import Latents
from dsjax.config import Config

# Logical axis names of the cache leaves (mapped to mesh axes by the `sharding` rules table).
CACHE_LAYERS, CACHE_BATCH, CACHE_SEQUENCE = "layers", "cache_batch", "cache_sequence"
_FEATURE_AXES = Latents(kv="kv_lora", k_pe="qk_rope", index_k="index_head")


def _latents(config: Config, lead: tuple[int, ...], dt: Any) -> Latents:
    c = config
    z = lambda d: jnp.zeros(lead + (d,), dt)
    return Latents(z(c.kv_lora_rank), z(c.qk_rope_head_dim), z(c.index_head_dim) if c.has_indexer else None)


def init_cache(config: Config, batch: int, max_len: int, dtype: Any = None, *, mtp: bool = False) -> dict[str, Any]:
    """An empty cache for `batch` sequences of up to `max_len` tokens (layout in the module docstring).

    dtype: storage dtype of the latents (default: the compute dtype). mtp: also cache the MTP block's
    latents (speculative decoding drafts with it).
    """
    c = config
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be positive.")
    dt = dtype or c.compute_dtype
    out: dict[str, Any] = {}
    if c.n_dense_layers:
        out["dense"] = _latents(c, (c.n_dense_layers, batch, max_len), dt)
    if c.n_moe_layers:
        out["moe"] = _latents(c, (c.n_moe_layers, batch, max_len), dt)
    if mtp:
        if not c.num_nextn_predict_layers:
            raise ValueError("init_cache(mtp=True): this config has no MTP module (num_nextn_predict_layers=0).")
        out["mtp"] = _latents(c, (batch, max_len), dt)
    out["lengths"] = jnp.zeros((batch,), jnp.int32)
    return out


def cache_axes(config: Config, *, mtp: bool = False) -> dict[str, Any]:
    """Logical axis names of every cache leaf (same tree as `init_cache`), e.g.
    ("layers", "cache_batch", "cache_sequence", "kv_lora") for the latents of a layer stack."""
    c = config

    def lat(lead: tuple[str, ...]) -> Latents:
        return Latents(*(None if (f == "index_k" and not c.has_indexer) else lead + (getattr(_FEATURE_AXES, f),)
                         for f in Latents._fields))

    out: dict[str, Any] = {}
    if c.n_dense_layers:
        out["dense"] = lat((CACHE_LAYERS, CACHE_BATCH, CACHE_SEQUENCE))
    if c.n_moe_layers:
        out["moe"] = lat((CACHE_LAYERS, CACHE_BATCH, CACHE_SEQUENCE))
    if mtp:
        out["mtp"] = lat((CACHE_BATCH, CACHE_SEQUENCE))
    out["lengths"] = (CACHE_BATCH,)
    return out


def bytes_per_token(config: Config, dtype: Any = None) -> dict[str, int]:
    """Cache bytes per token per layer: {"latent", "rope_key", "index_key", "total"} (see module docstring)."""
    c = config
    item = jnp.dtype(dtype or c.compute_dtype).itemsize
    out = {"latent": c.kv_lora_rank * item, "rope_key": c.qk_rope_head_dim * item,
           "index_key": c.index_head_dim * item if c.has_indexer else 0}
    out["total"] = sum(out.values())
    return out


def cache_bytes(config: Config, batch: int, max_len: int, dtype: Any = None, *, mtp: bool = False) -> int:
    """Total bytes of `init_cache(config, batch, max_len, dtype, mtp=mtp)` (without allocating it)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype, mtp=mtp))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def layer_caches(cache: dict[str, Any]) -> dict[str, Latents]:
    """The main model's per-stack caches (what `model.forward_hidden(cache=...)` reads and returns)."""
    return {k: v for k, v in cache.items() if k in ("dense", "moe")}


def write(cache: Latents, new: Latents, positions: jax.Array, layer: jax.Array | None = None) -> Latents:
    """Store the new tokens' latents at their positions; positions < 0 (padding) are dropped.

    new leaves [B, T, .], positions [B, T]. cache leaves [B, S, .] (one layer), or with `layer` a stacked
    cache [L, B, S, .] written at that layer: only the T new rows are touched, so a donated cache is
    updated in place instead of copied.
    """
    s = cache.kv.shape[-2]
    pos = jnp.where(positions >= 0, positions, s)
    rows = jnp.arange(pos.shape[0])[:, None]

    def put(c, n):
        if c is None:
            return None
        idx = (rows, pos) if layer is None else (layer, rows, pos)
        return c.at[idx].set(n.astype(c.dtype), mode="drop")

    return Latents(*(put(c, n) for c, n in zip(cache, new)))


def read(cache: Latents, layer: jax.Array | None = None) -> Latents:
    """The cached latents of one layer as the attention ops consume them (leaves [B, S, .]); `layer`
    selects it from a stacked cache [L, B, S, .]."""
    if layer is None:
        return cache
    return Latents(*(None if c is None else jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)
                     for c in cache))
