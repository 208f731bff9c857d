"""Multi-head Latent Attention with DeepSeek Sparse Attention, in the absorbed (MQA) form (spec §4).

Per token the keys and values are one latent row c (kv_lora_rank, 512) plus one rotary key k_pe (64),
shared by all heads. `wkv_b` is folded into the queries (q_abs = q_nope · W_UK) and into the output
(o = o_lat · W_UV), so attention runs over the latent and K/V are never expanded per head.

Which keys a query sees:
  * V3.2 with more keys than `index_topk`: the lightning indexer's top-k, via `pallas_kernels.sparse_mla`
    (O(T·k) compute and memory).
  * otherwise (V3, or every causal key fits in the top-k): all causal keys, via `pallas_kernels.dense_mla`.
    For V3.2 this is exact, since the top-k then selects every visible key.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

import pallas_kernels
from dsjax import cache as cache_lib, fp8, indexer, indexer_loss as indexer_loss_lib
from dsjax.config import Config
from dsjax.latents import Latents, PackedLatents, Queries
from dsjax.layers import dense, fp8_linear, is_fp8, rms_norm, weight
from dsjax.parallel import HEADS, LATENT, Parallelism, constrain
from dsjax.rope import rope_halfsplit, rope_interleaved


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config) -> jax.Array:
    return (rope_interleaved if config.rope_interleave else rope_halfsplit)(x, cos, sin)


def project(p: Mapping[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config,
            parallel: Parallelism | None = None) -> tuple[Queries, Latents]:
    """Query and latent projections of MLA (and of the indexer, for V3.2).

    x: [B, T, D] attn-normed hidden; cos/sin: [B, T, dr/2] for the tokens' positions.
    """
    with jax.named_scope("attn_proj"):
        q, kv, cq = _project(p, x, cos, sin, config)
    # heads over `tensor`, tokens like the residual stream: the partitioner would otherwise guess
    q = q._replace(q_abs=constrain(q.q_abs, HEADS, parallel), q_pe=constrain(q.q_pe, HEADS, parallel))
    kv = kv._replace(kv=constrain(kv.kv, LATENT, parallel), k_pe=constrain(kv.k_pe, LATENT, parallel))
    if config.has_indexer:  # detached (spec §10.2): the indexer is trained only by its own KL loss
        sg = jax.lax.stop_gradient
        with jax.named_scope("indexer_proj"):
            iq, iw, ik = indexer.project(p["indexer"], sg(x), sg(cq), cos, sin, config)
        q, kv = q._replace(index_q=iq, index_w=iw), kv._replace(index_k=ik)
    return q, kv


def _project(p: Mapping[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array,
             config: Config) -> tuple[Queries, Latents, jax.Array | None]:
    """MLA's own projections -> (queries, latents, the normed query latent cq or None without q_lora)."""
    c = config
    h, dn, r = c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank
    off = c.official_numerics
    if c.q_lora_rank is None:
        cq = None
        q = dense(x, p["wq"], (c.hidden_size, h, c.qk_head_dim), official=off)
    else:
        cq = rms_norm(dense(x, p["wq_a"], official=off), p["q_norm"], c.rms_norm_eps)
        q = dense(cq, p["wq_b"], (c.q_lora_rank, h, c.qk_head_dim), official=off)
    q_nope, q_pe = q[..., :dn], _rope(q[..., dn:], cos, sin, c)
    kv = dense(x, p["wkv_a"], official=off)
    latent = rms_norm(kv[..., :r], p["kv_norm"], c.rms_norm_eps)
    if off:  # the FP8 KV-cache precision the official code simulates, before caching and before use (spec §4.6)
        latent = fp8.fp8_roundtrip(latent.astype(jnp.bfloat16)).astype(latent.dtype)
    k_pe = _rope(kv[..., r:], cos, sin, c)
    w_uk = weight(p["wkv_b"], (r, h, dn + c.v_head_dim), x.dtype)[..., :dn]
    q_abs = jnp.einsum("bthd,rhd->bthr", q_nope, w_uk, preferred_element_type=jnp.float32).astype(x.dtype)
    return Queries(q_abs, q_pe, None, None), Latents(latent, k_pe, None), cq


def attend(q: Queries, kv: Latents, config: Config, *, q_positions: jax.Array, k_positions: jax.Array,
           q_segment_ids: jax.Array | None = None, k_segment_ids: jax.Array | None = None,
           selection: jax.Array | None = None,
           parallel: Parallelism | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Latent attention of queries over latents -> (o_lat [B, T, H, kv_lora_rank], the selected keys).

    Positions decide causality (k_pos <= q_pos; padding keys have k_pos = -1); segment ids keep packed
    documents apart. The indexer runs only when it can prune: more keys than `index_topk`; the keys it
    selected come back as int32 [B, T, index_topk] (-1: empty slot), else None. selection: replay those keys
    instead of running the indexer (`dsjax.selection`: the same sparse pattern in another forward).
    With `parallel`, its `attend` runs `attend_local` per device (e.g. sequence-parallel DSA).
    """
    kw = dict(q_positions=q_positions, k_positions=k_positions, q_segment_ids=q_segment_ids,
              k_segment_ids=k_segment_ids, selection=selection)
    if parallel is not None:
        return parallel.attend(attend_local, q, kv, config, **kw)
    return attend_local(q, kv, config, **kw)


def is_sparse(config: Config, n_keys: int) -> bool:
    """Whether attention over `n_keys` keys runs DSA (the indexer's top-k) rather than all causal keys."""
    return config.has_indexer and n_keys > config.index_topk


def _replayed(selection: jax.Array | None, n_keys: int, config: Config) -> jax.Array | None:
    if selection is not None and not is_sparse(config, n_keys):
        raise ValueError(f"a key selection was given for attention over {n_keys} keys, where every causal key "
                         f"is attended (index_topk={config.index_topk}): pass none.")
    return selection


def visibility_in_place(anchor: jax.Array, **vis: jax.Array | None) -> dict[str, jax.Array | None]:
    """The visibility inputs (positions, segment ids) tied to this layer's activations `anchor`.

    An optimization barrier (no compute, no copy) makes them depend on loop-variant data. Without it, JAX's
    scan partial evaluation (autodiff, remat) sees the causal / segment masks of every attention and indexer
    query chunk as functions of the layer scan's constants alone and computes them once, outside the loop,
    stacked into one [n_chunks, B, chunk, L] = L×L bool array. Tied, each chunk evaluates its mask in place
    from its own positions (tests/test_memory_scaling.py scans the compiled train steps for L² buffers).
    """
    names = [k for k, v in vis.items() if v is not None]
    tied = jax.lax.optimization_barrier((tuple(vis[k] for k in names), anchor))[0]
    return {**vis, **dict(zip(names, tied))}


def attend_local(q: Queries, kv: Latents, config: Config, *, q_positions: jax.Array, k_positions: jax.Array,
                 q_segment_ids: jax.Array | None = None, k_segment_ids: jax.Array | None = None,
                 selection: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`attend` on arrays that are all on one device (or one shard): indexer top-k (or the replayed
    `selection`), then sparse MLA; or dense MLA. -> (o_lat, selected keys or None)."""
    c = config
    v = visibility_in_place(q.q_abs, q_positions=q_positions, k_positions=k_positions,
                            q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
    q_positions, k_positions, q_segment_ids, k_segment_ids = (
        v["q_positions"], v["k_positions"], v["q_segment_ids"], v["k_segment_ids"])
    n_keys = kv.kv.shape[1]
    idx = _replayed(selection, n_keys, c)
    if is_sparse(c, n_keys):
        if idx is None:
            with jax.named_scope("indexer_topk"):
                idx = indexer.select(q.index_q, q.index_w, kv.index_k, config=c, q_positions=q_positions,
                                     k_positions=k_positions, q_segment_ids=q_segment_ids,
                                     k_segment_ids=k_segment_ids)
        with jax.named_scope("sparse_mla"):
            return pallas_kernels.sparse_mla(q.q_abs, q.q_pe, kv.kv, kv.k_pe, idx, scale=c.softmax_scale,
                                             backend=c.attention_backend, interpret=c.kernel_interpret,
                                             prefix_valid=True), idx
    with jax.named_scope("dense_mla"):
        return pallas_kernels.dense_mla(q.q_abs, q.q_pe, kv.kv, kv.k_pe, scale=c.softmax_scale,
                                        q_positions=q_positions, k_positions=k_positions,
                                        q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                        backend=c.attention_backend, interpret=c.kernel_interpret), None


def _reads_in_place(cache, layer, config: Config, parallel) -> bool:
    """A packed stacked cache on one device, long enough for the sparse path, with plain index keys."""
    return (isinstance(cache, PackedLatents) and layer is not None and parallel is None
            and cache.rows.shape[-2] > config.index_topk and not isinstance(cache.index_k, cache_lib.IndexKey))


def _attend_packed(q: Queries, cache: PackedLatents, layer: jax.Array, config: Config,
                   positions: jax.Array, selection: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """DSA over layer `layer` of a stacked packed cache, read in place by the kernels (the indexer's key
    blocks and the sparse MLA's row DMAs address [layer, b, s] directly) -> (o_lat [B, T, H, C], keys)."""
    c = config
    b, s = positions.shape[0], cache.rows.shape[-2]
    k_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    idx = selection
    if idx is None:
        with jax.named_scope("indexer_topk"):
            idx = pallas_kernels.indexer_topk(q.index_q, q.index_w, cache.index_k, topk=c.index_topk,
                                              q_positions=positions, k_positions=k_positions,
                                              backend=c.indexer_backend, interpret=c.kernel_interpret,
                                              k_layer=layer)
    with jax.named_scope("sparse_mla"):
        o = pallas_kernels.sparse_mla_cached(q.q_abs, q.q_pe, cache.rows, layer, idx, scale=c.softmax_scale,
                                             backend=c.attention_backend, interpret=c.kernel_interpret,
                                             prefix_valid=True)
    return o.astype(q.q_abs.dtype), idx


@jax.named_scope("attn_out")
def output(p: Mapping[str, Any], o_lat: jax.Array, config: Config) -> jax.Array:
    """Un-absorb and project: o = o_lat · W_UV per head, then wo. o_lat [B, T, H, C] -> [B, T, D]."""
    c = config
    h, dn, r = c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank
    w_uv = weight(p["wkv_b"], (r, h, dn + c.v_head_dim), o_lat.dtype)[..., dn:]
    o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv, preferred_element_type=jnp.float32).astype(o_lat.dtype)
    if c.official_numerics and is_fp8(p["wo"]):  # the official wo(o.flatten(2)): an FP8 linear over H·dv
        return fp8_linear(o.reshape(o.shape[:2] + (h * c.v_head_dim,)), p["wo"])
    wo = weight(p["wo"], (h, c.v_head_dim, c.hidden_size), o.dtype)
    return jnp.einsum("bthv,hvd->btd", o, wo, preferred_element_type=jnp.float32).astype(o.dtype)


def _attend_with_indexer_loss(q: Queries, kv: Latents, config: Config, mode: str, *, positions: jax.Array,
                              segment_ids: jax.Array | None, selection: jax.Array | None = None,
                              ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Training-time attention plus the indexer's KL loss (spec §10) -> (o_lat, f32 loss, selected keys).

    "dense_warmup": dense causal attention for every query, KL over all causal keys. "sparse": DSA top-k
    attention as in `attend`, KL over the selected keys (all causal keys when they fit in the top-k).
    "dense_recall" (evaluation): dense attention, and in place of the loss the indexer's top-k recall of the
    attention's top-k (`indexer_loss.dense_recall`). selection: as in `attend` ("sparse" only).
    """
    c = config
    sparse = mode == "sparse" and is_sparse(c, kv.kv.shape[1])
    if selection is not None and not sparse:
        raise ValueError(f"a key selection was given to the {mode!r} indexer-loss attention, which attends "
                         f"every causal key: pass none.")
    vis = visibility_in_place(q.q_abs, q_positions=positions, k_positions=positions, q_segment_ids=segment_ids,
                              k_segment_ids=segment_ids)
    ind = (q.index_q, q.index_w, kv.index_k)
    tgt = (q.q_abs, q.q_pe, kv.kv, kv.k_pe)
    if sparse:
        idx = selection
        if idx is None:
            with jax.named_scope("indexer_topk"):
                idx = indexer.select(*ind, config=c, **vis)
        with jax.named_scope("sparse_mla"):
            o_lat, lse = pallas_kernels.sparse_mla_with_lse(*tgt, idx, scale=c.softmax_scale,
                                                            backend=c.attention_backend,
                                                            interpret=c.kernel_interpret, prefix_valid=True)
        with jax.named_scope("indexer_kl"):
            return o_lat, indexer_loss_lib.sparse_kl(*ind, *tgt, idx, lse=lse, scale=c.softmax_scale), idx
    with jax.named_scope("dense_mla"):
        o_lat, lse = pallas_kernels.dense_mla_with_lse(*tgt, scale=c.softmax_scale, backend=c.attention_backend,
                                                       interpret=c.kernel_interpret, **vis)
    if mode == "dense_recall":  # evaluation: the indexer's top-k recall of the dense attention's top-k
        with jax.named_scope("indexer_recall"):
            return o_lat, indexer_loss_lib.dense_recall(*ind, *tgt, scale=c.softmax_scale, topk=c.index_topk,
                                                        **vis), None
    with jax.named_scope("indexer_kl"):  # the target from the attention's own lse (the kernels' statistics)
        return o_lat, indexer_loss_lib.dense_kl(*ind, *tgt, scale=c.softmax_scale, lse=lse, **vis), None


def mla(p: Mapping[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array, config: Config, *,
        positions: jax.Array, segment_ids: jax.Array | None = None, cache: Latents | None = None,
        layer: jax.Array | None = None, indexer_loss: str | None = None, selection: jax.Array | None = None,
        parallel: Parallelism | None = None
        ) -> tuple[jax.Array, Latents | None, jax.Array | None, jax.Array | None]:
    """MLA (+ DSA) self-attention of new tokens x [B, T, D] -> ([B, T, D], updated cache, indexer loss,
    selected keys).

    Without a cache the tokens attend to each other (training, one-shot prefill). With a cache (leaves
    [B, S_max, .], slot index = position; or a stacked [L, B, S_max, .] cache and this `layer`'s index)
    their latents are written at `positions` first and the queries attend over the whole cache; slots
    past a query's position are invisible by causality.
    indexer_loss (static, training without a cache): None, "dense_warmup" or "sparse" adds the indexer's
    KL loss (f32 scalar; else None), see `_attend_with_indexer_loss`.
    selection: int32 [B, T, index_topk] keys to attend instead of the indexer's choice (replay: what an
    earlier forward returned; valid slots first, -1 after); the keys used come back (None when attention
    is dense). parallel: the run's layout (`dsjax.parallel`); None =
    one device.
    """
    q, kv = project(p, x, cos, sin, config, parallel)
    if indexer_loss is not None:
        indexer_loss_lib.check_mode(indexer_loss, config, has_cache=cache is not None)
        o_lat, loss, idx = _attend_with_indexer_loss(q, kv, config, indexer_loss, positions=positions,
                                                     segment_ids=segment_ids, selection=selection)
        return output(p, o_lat, config), None, loss, idx
    if cache is None:
        o_lat, idx = attend(q, kv, config, q_positions=positions, k_positions=positions,
                            q_segment_ids=segment_ids, k_segment_ids=segment_ids, selection=selection,
                            parallel=parallel)
        return output(p, o_lat, config), None, None, idx
    if segment_ids is not None:
        raise ValueError("segment_ids (packed rows) are not supported together with a KV cache.")
    cache = cache_lib.write(cache, kv, positions, layer)
    if _reads_in_place(cache, layer, config, parallel):
        o_lat, idx = _attend_packed(q, cache, layer, config, positions, selection)
        return output(p, o_lat, config), cache, None, idx
    keys = cache_lib.read(cache, layer, config)
    b, s = keys.kv.shape[:2]
    k_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    o_lat, idx = attend(q, keys, config, q_positions=positions, k_positions=k_positions, selection=selection,
                        parallel=parallel)
    return output(p, o_lat, config), cache, None, idx
