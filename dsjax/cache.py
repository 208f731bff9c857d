"""The KV cache of MLA + DSA: per layer, the latent (kv_lora_rank), the rotary key (qk_rope_head_dim)
and the indexer key (index_head_dim), slot index = token position; plus each sequence's length.

Layout (a plain dict pytree):

    {"dense":   Latents,        leaves [L_dense, B, S_max, dim]   (matching the scanned stacks)
     "moe":     Latents,        leaves [L_moe,   B, S_max, dim]
     "mtp":     Latents,        leaves [B, S_max, dim]             (only with `mtp=True`: the MTP block)
     "lengths": int32 [B]}      tokens written so far per sequence (= the next write position)

With `indexer_numerics="official_fp8"` the indexer key is kept as the official kernels keep it (spec §5.5):
`IndexKey(k8 e4m3 [..., S, Di], scale f32 [..., S, 1])`, written with `indexer.quantize_index_key` and
read back with `dequantize_index_key`. The key that mode produces is already FP8-representable, so the
round trip is lossless and decoding from this cache equals the full forward.

On TPU the latent stacks are kept packed (`PackedLatents`: latent + rotary key fused into one uint32 row per
token, `pallas_kernels.latent_pack`), the row the sparse-MLA kernel gathers with one DMA. The decode step's
layer scan then hands the whole stacked cache and the layer index to the kernels (sparse MLA and indexer),
which read that layer in place: no layer of the cache is sliced or copied per step. `init_cache(packed=...)`
chooses (default: packed on a TPU default device when the config can use it); the XLA path reads packed
rows too (it unpacks a slice). Stored rows are 384 words = 1,536 B/token (the (8, 128) tile pads 288 to 384).

Slots past a sequence's length may hold stale latents (a rejected speculative draft, right padding): they
are never visible, because a key is visible only at k_pos <= q_pos and each sequence writes its slots in
order, overwriting position p before any query at p reads it.

Size per token per layer (`bytes_per_token` computes it for any config), in bf16:

    latent 512·2 + rope key 64·2  = 1152 B (spec §4.3, as the official demo caches it)
    + indexer key, bf16 128·2     =  256 B (spec §13: HF's index-key cache)          -> 1408 B
    + indexer key, FP8 128 + 4    =  132 B (spec §5.5: official, "official_fp8")      -> 1284 B
    V3 (no indexer)                                                                    -> 1152 B
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import latent_pack

from dsjax import fp8
from dsjax.latents import Latents, PackedLatents
from dsjax.config import Config
from dsjax.indexer import dequantize_index_key, quantize_index_key


class IndexKey(NamedTuple):
    """The official indexer-key storage: one FP8 vector and one UE8M0 (power-of-two) scale per token."""

    k8: jax.Array  # float8_e4m3fn [..., S, Di]
    scale: jax.Array  # f32 [..., S, 1]


# Logical axis names of the cache leaves: the `sharding` rules table maps them to mesh axes (batch like
# the activations, slots over `sequence`, layers and feature dims replicated).
CACHE_LAYERS, CACHE_BATCH, CACHE_LENGTH, CACHE_DIM = "cache_layers", "cache_batch", "cache_length", "cache_dim"


def fp8_index_keys(config: Config) -> bool:
    """Whether the cache stores indexer keys in the official FP8 format (with official numerics)."""
    return config.has_indexer and config.indexer_numerics == "official_fp8"


def packed_supported(config: Config, dtype: Any = None) -> bool:
    """Whether the latent stacks can be kept packed: V3.2 (the sparse kernel reads them), bf16 storage and
    latent/rope widths the TPU kernel takes."""
    c = config
    return (c.has_indexer and jnp.dtype(dtype or c.compute_dtype) == jnp.bfloat16 and c.kv_lora_rank % 256 == 0
            and c.qk_rope_head_dim % 2 == 0)


def _latents(config: Config, lead: tuple[int, ...], dt: Any, packed: bool = False) -> Latents | PackedLatents:
    c = config
    z = lambda d, t=dt: jnp.zeros(lead + (d,), t)
    index_k = None
    if c.has_indexer:
        index_k = (IndexKey(z(c.index_head_dim, fp8.E4M3), z(1, jnp.float32)) if fp8_index_keys(c)
                   else z(c.index_head_dim))
    if packed:
        return PackedLatents(z(latent_pack.row_words(c.kv_lora_rank, c.qk_rope_head_dim), jnp.uint32), index_k)
    return Latents(z(c.kv_lora_rank), z(c.qk_rope_head_dim), index_k)


def init_cache(config: Config, batch: int, max_len: int, dtype: Any = None, *, mtp: bool = False,
               packed: bool | None = None) -> dict[str, Any]:
    """An empty cache for `batch` sequences of up to `max_len` tokens (layout in the module docstring).

    dtype: storage dtype of the latents (default: the compute dtype). mtp: also cache the MTP block's
    latents (speculative decoding drafts with it). packed: keep the layer stacks as `PackedLatents`
    (None: when `packed_supported` on a TPU default device and max_len > index_topk, so the sparse path
    runs; pass True to plan a TPU decode from another host).
    """
    c = config
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be positive.")
    dt = dtype or c.compute_dtype
    if packed is None:
        packed = packed_supported(c, dt) and jax.default_backend() == "tpu" and max_len > c.index_topk
    elif packed and not packed_supported(c, dt):
        raise ValueError(f"init_cache(packed=True) needs a V3.2 config with a bf16 cache, kv_lora_rank % 256 == 0 "
                         f"and an even qk_rope_head_dim (got {jnp.dtype(dt).name}, kv_lora_rank={c.kv_lora_rank}, "
                         f"qk_rope_head_dim={c.qk_rope_head_dim}, indexer={c.has_indexer}).")
    out: dict[str, Any] = {}
    if c.n_dense_layers:
        out["dense"] = _latents(c, (c.n_dense_layers, batch, max_len), dt, packed)
    if c.n_moe_layers:
        out["moe"] = _latents(c, (c.n_moe_layers, batch, max_len), dt, packed)
    if mtp:
        if not c.num_nextn_predict_layers:
            raise ValueError("init_cache(mtp=True): this config has no MTP module (num_nextn_predict_layers=0).")
        out["mtp"] = _latents(c, (batch, max_len), dt)
    out["lengths"] = jnp.zeros((batch,), jnp.int32)
    return out


def axes_of(cache: Any) -> dict[str, Any]:
    """Logical axis names of every leaf of a cache (arrays or `jax.ShapeDtypeStruct`s; same tree), e.g.
    ("cache_layers", "cache_batch", "cache_length", "cache_dim") for the latents of a layer stack."""
    lead = {"dense": (CACHE_LAYERS,), "moe": (CACHE_LAYERS,), "mtp": ()}
    out: dict[str, Any] = {}
    for key, sub in cache.items():
        if key == "lengths":
            out[key] = (CACHE_BATCH,)
        else:
            names = lead[key] + (CACHE_BATCH, CACHE_LENGTH, CACHE_DIM)
            out[key] = jax.tree.map(lambda _: names, sub)
    return out


def cache_axes(config: Config, *, mtp: bool = False) -> dict[str, Any]:
    """Logical axis names of every leaf of `init_cache(config, ..., mtp=mtp)` (same tree)."""
    return axes_of(jax.eval_shape(lambda: init_cache(config, 1, 1, mtp=mtp)))


def bytes_per_token(config: Config, dtype: Any = None) -> dict[str, int]:
    """Cache bytes per token per layer: {"latent", "rope_key", "index_key", "total"} (see module docstring)."""
    c = config
    item = jnp.dtype(dtype or c.compute_dtype).itemsize
    index_key = 0
    if c.has_indexer:
        index_key = c.index_head_dim + 4 if fp8_index_keys(c) else c.index_head_dim * item
    out = {"latent": c.kv_lora_rank * item, "rope_key": c.qk_rope_head_dim * item, "index_key": index_key}
    out["total"] = sum(out.values())
    return out


def cache_bytes(config: Config, batch: int, max_len: int, dtype: Any = None, *, mtp: bool = False,
                packed: bool | None = None) -> int:
    """Total bytes of `init_cache(config, batch, max_len, dtype, mtp=mtp, packed=packed)` (not allocated)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype, mtp=mtp, packed=packed))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def layer_caches(cache: dict[str, Any]) -> dict[str, Latents]:
    """The main model's per-stack caches (what `model.forward_hidden(cache=...)` reads and returns)."""
    return {k: v for k, v in cache.items() if k in ("dense", "moe")}


def write(cache: Latents | PackedLatents, new: Latents, positions: jax.Array,
          layer: jax.Array | None = None) -> Latents | PackedLatents:
    """Store the new tokens' latents at their positions; positions < 0 (padding) are dropped.

    new leaves [B, T, .], positions [B, T]. cache leaves [B, S, .] (one layer), or with `layer` a stacked
    cache [L, B, S, .] written at that layer: only the T new rows are touched, so a donated cache is
    updated in place instead of copied.
    """
    s = (cache.rows if isinstance(cache, PackedLatents) else cache.kv).shape[-2]
    pos = jnp.where(positions >= 0, positions, s)
    rows = jnp.arange(pos.shape[0])[:, None]

    def put(c, n):
        if c is None:
            return None
        if isinstance(c, IndexKey):
            return IndexKey(*(put(a, b) for a, b in zip(c, quantize_index_key(n))))
        idx = (rows, pos) if layer is None else (layer, rows, pos)
        return c.at[idx].set(n.astype(c.dtype), mode="drop")

    if isinstance(cache, PackedLatents):
        return PackedLatents(put(cache.rows, latent_pack.pack(new.kv, new.k_pe)), put(cache.index_k, new.index_k))
    return Latents(*(put(c, n) for c, n in zip(cache, new)))


def read(cache: Latents | PackedLatents, layer: jax.Array | None = None,
         config: Config | None = None) -> Latents:
    """The cached latents of one layer as the attention ops consume them (leaves [B, S, .], FP8 index
    keys dequantised, packed rows unpacked: a copy of the layer; config gives their widths); `layer` selects
    it from a stacked cache [L, B, S, .]. (The TPU decode path reads a packed stack in place instead.)"""
    if layer is not None:
        cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False), cache)
    if isinstance(cache, PackedLatents):
        if config is None:
            raise ValueError("cache.read of a packed cache needs the config (the latent and rope widths).")
        kv, k_pe = latent_pack.unpack(cache.rows, config.kv_lora_rank, config.qk_rope_head_dim)
        cache = Latents(kv, k_pe, cache.index_k)
    if isinstance(cache.index_k, IndexKey):
        cache = cache._replace(index_k=dequantize_index_key(*cache.index_k, dtype=cache.kv.dtype))
    return cache
