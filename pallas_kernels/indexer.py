"""Dispatch of the lightning-indexer ops (scores, and chunked top-k selection).

Backends: "xla" (`reference.py`, chunked einsums; the oracle), "pallas_tpu" (`indexer_tpu.py`, Mosaic)
and "pallas_gpu" (`indexer_gpu.py`, Triton). The kernels compute the fused scores; top-k runs on each
query chunk's [B, T_chunk, S] scores right after the kernel, so peak memory is O(T_chunk · S).

Ties: exact score ties at the k-th place are common (ReLU gives exact zeros, FP8 gives quantised scores), so
the selection follows one rule on every backend: higher score first, and among equal scores the lower key
index (`lax.top_k`'s documented order). Rollouts and training, or a TPU server and a CPU test, then select
the same keys. (`lax.approx_max_k(recall_target=1.0)`, exact and faster on TPU, leaves the order of ties
unspecified, so it is not used.) Slots whose score is -inf (fewer visible keys than k) get -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import indexer_gpu, indexer_tpu, reference
from pallas_kernels.dispatch import by_platform, resolve_backend

IMPLEMENTED = ("xla", "pallas_tpu", "pallas_gpu")


def _kernel_chunk_fn(backend: str, interpret, layer=None):
    """A `reference._indexer_chunk`-compatible scorer running the backend's Pallas kernel. With `layer`, k
    is a stacked cache [L, B, S, Di]: the TPU kernel reads that layer in place, the others take a slice."""
    def score_chunk(q, w, k, qpos, kpos, qseg, kseg):
        if qseg is None:  # unpacked rows: one segment (the kernels always compare segment ids)
            qseg, kseg = jnp.zeros(qpos.shape, jnp.int32), jnp.zeros(kpos.shape, jnp.int32)
        if backend == "pallas_tpu":
            return indexer_tpu.indexer_scores_tpu(q, w, k, qpos, kpos, qseg, kseg, interpret=interpret, layer=layer)
        k = k if layer is None else jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
        return indexer_gpu.indexer_scores_gpu(q, w, k, qpos, kpos, qseg, kseg, interpret=interpret)

    return score_chunk


def _topk_fn(backend: str, topk: int):
    del backend  # one tie-break rule on every backend (module docstring)
    return lambda sc: reference.topk_indices(sc, topk)


def indexer_scores(q, w, k, *, q_positions, k_positions=None, q_segment_ids=None, k_segment_ids=None,
                   backend: str | None = None, interpret=False, chunk_size: int | None = None):
    """Lightning-indexer scores Σ_h w·ReLU(q·k) -> float32 [B, T, S], -inf where the key is not visible.

    q: [B, T, Hi, Di], w: [B, T, Hi] (softmax scale folded in), k: [B, S, Di];
    q_positions: [B, T] or [T]; k_positions: [B, S] or [S] (default arange(S)); visibility is
    k_pos <= q_pos, k_pos >= 0 and equal segment ids (q_segment_ids [B, T], k_segment_ids [B, S]).
    backend: "xla", "pallas_tpu", "pallas_gpu" or None (the kernel of the platform the program is lowered
    for, XLA on CPU: `dispatch.by_platform`); interpret: run the
    Pallas kernel in interpret mode (True, or a `pltpu.InterpretParams` for the TPU kernel).
    chunk_size: query rows per step of the XLA scan (the kernels tile the whole [T, S] themselves).
    """
    def xla(q, w, k):
        return reference.indexer_scores(q, w, k, q_positions=q_positions, k_positions=k_positions,
                                        q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                        chunk_size=chunk_size)

    def kernel(name):
        def run(q, w, k):
            bt, t = q.shape[:2]
            qp = reference._positions(q_positions, bt, t)
            kp = reference._positions(k_positions, bt, k.shape[1])
            qs = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
            ks = None if k_segment_ids is None else jnp.asarray(k_segment_ids, jnp.int32)
            return _kernel_chunk_fn(name, interpret)(q, w, k, qp, kp, qs, ks)
        return run

    return _dispatch(backend, (q, w, k), xla, kernel)


def _dispatch(backend, args, xla, kernel):
    """backend None: the lowering platform's kernel (`by_platform`); else the named implementation.

    The kernels carry no gradient (the selected indices have none; the indexer trains on its KL loss, which
    differentiates the XLA formula), so their inputs are stop_gradient'ed: differentiating the platform
    switch differentiates every branch, and a Pallas call has no JVP.
    """
    def nograd(name):
        return lambda *a: kernel(name)(*jax.lax.stop_gradient(a))

    if backend is None:
        return by_platform(*args, default=xla, tpu=nograd("pallas_tpu"), gpu=nograd("pallas_gpu"))
    b = resolve_backend(backend, IMPLEMENTED)
    return xla(*args) if b == "xla" else nograd(b)(*args)


def indexer_topk(q, w, k, *, topk: int, q_positions, k_positions=None, q_segment_ids=None, k_segment_ids=None,
                 backend: str | None = None, interpret=False, chunk_size: int | None = None, k_layer=None):
    """Indices of the top-`topk` indexer scores per query -> int32 [B, T, min(topk, S)], best first; -1 fills
    the slots beyond the visible keys (so the valid slots always come first: `sparse_mla(prefix_valid=True)`).
    Works over query chunks: peak memory O(T_chunk · S), never O(T · S).

    Arguments as `indexer_scores`; chunk_size = query rows per chunk (default: sized to a 128 MiB
    working set). Ties at the k-th score go to the lower key index on every backend.
    k_layer: k is a stacked key cache [L, B, S, Di] and this int32 scalar its layer; the TPU kernel reads
    the layer in place (a decode step's layer scan then copies no layer's keys), the XLA path slices it.
    """
    def xla(q, w, k):
        if k_layer is not None:
            k = jax.lax.dynamic_index_in_dim(k, k_layer, 0, keepdims=False)
        return reference.indexer_topk(q, w, k, topk=topk, q_positions=q_positions, k_positions=k_positions,
                                      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                      chunk_size=chunk_size)

    def kernel(name):
        def run(q, w, k):
            kk = min(int(topk), k.shape[-2])
            bt, s_len = q.shape[0], k.shape[-2]
            return reference._indexer_scan(q, w, k, q_positions, k_positions, q_segment_ids, k_segment_ids,
                                           chunk_size, _topk_fn(name, kk),
                                           score_chunk=_kernel_chunk_fn(name, interpret, k_layer),
                                           row_bytes=bt * s_len * 4 * 3)
        return run

    return _dispatch(backend, (q, w, k), xla, kernel)
