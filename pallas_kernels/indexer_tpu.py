"""Lightning-indexer scores as a Pallas TPU (Mosaic) kernel.

    I[b, t, s] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, s])       (f32, -inf where s is not visible)

Grid (B, T/bq, S/bs), one (query block × key block) tile per step (notes §4.4):
  * the bq·Hi query-head rows of the block form the MXU's M dimension (bq = 8, Hi = 64 -> 512 rows),
    the key block the N dimension, Di the contraction; f32 accumulation;
  * ReLU and the weighted head sum stay in VMEM: the weights arrive as a [bq·Hi, 1] column (a lane
    broadcast), and the sum over Hi is a sublane reduction of the [bq, Hi, bs] view — exact in f32,
    unlike moving the reduction onto the MXU as a block-diagonal matmul (bf16 passes for f32 weights);
  * tiles with every key in the future of every query of the block are skipped: a scalar-prefetched
    `n_blocks[b, i]` (number of key blocks query block i needs) guards the compute, and the key
    BlockSpec's index_map is clamped to the last needed block, so the pipeline sees a repeated block
    index and issues no DMA for skipped tiles;
  * positions and segment ids arrive as small blocks ([bq, 1] queries, [1, bs] keys), so the same kernel
    serves prefill, chunked prefill, decode (T != S) and packed rows.
The output is lane-dense f32 [B, T, S] blocks of (bq, bs); bs is a multiple of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
NEG_INF = float("-inf")
_INT_MAX = jnp.iinfo(jnp.int32).max


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def needed_key_blocks(qpos: jax.Array, kpos: jax.Array, bq: int, bs: int) -> jax.Array:
    """Per query block, how many leading key blocks hold a key it can see -> int32 [B, T/bq].

    Block j is needed by query block i iff its smallest non-padding key position is <= the largest
    query position of block i; everything from the last needed block on is entirely in the future (or
    padding) for every query of the block, so the kernel skips it. qpos [B, T], kpos [B, S] (padded to
    multiples of bq, bs; padding positions are -1).
    """
    b, t = qpos.shape
    q_max = jnp.max(qpos.reshape(b, t // bq, bq), axis=-1)
    k_min = jnp.min(jnp.where(kpos >= 0, kpos, _INT_MAX).reshape(b, -1, bs), axis=-1)
    nk = k_min.shape[1]
    need = k_min[:, None, :] <= q_max[:, :, None]  # [B, nq, nk]
    return jnp.max(jnp.where(need, jnp.arange(1, nk + 1, dtype=jnp.int32), 0), axis=-1).astype(jnp.int32)


def _kernel(nblk_ref, layer_ref, q_ref, w_ref, k_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, o_ref, *, bq, hi,
            nq):
    del layer_ref  # read by the key BlockSpec's index map
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_needed = nblk_ref[b * nq + i]

    @pl.when(j < n_needed)
    def _compute():
        q = q_ref[...]  # [bq·Hi, Di]
        k = k_ref[...]  # [bs, Di]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32)  # [bq·Hi, bs]
        s = jnp.maximum(s, 0.0) * w_ref[...]  # w column [bq·Hi, 1] broadcast over the key lanes
        sc = jnp.sum(s.reshape(bq, hi, s.shape[-1]), axis=1)  # [bq, bs]
        qp, kp = qpos_ref[...], kpos_ref[...]  # [bq, 1], [1, bs]
        vis = (kp <= qp) & (kp >= 0) & (qseg_ref[...] == kseg_ref[...])
        o_ref[...] = jnp.where(vis, sc, NEG_INF)

    @pl.when(j >= n_needed)
    def _skip():
        o_ref[...] = jnp.full(o_ref.shape, NEG_INF, F32)


def _key_block(s_len: int, block_k: int) -> int:
    """The key block: block_k, or for a stacked cache read in place the largest multiple of 128 <= block_k
    dividing S (so the cache is not padded, i.e. copied)."""
    for bs in range(min(block_k, _round_up(s_len, 128)), 127, -128):
        if s_len % bs == 0:
            return bs
    return min(block_k, _round_up(s_len, 128))


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def indexer_scores_tpu(q, w, k, qpos, kpos, qseg, kseg, *, block_q: int = 8, block_k: int = 512,
                       interpret=False, layer=None) -> jax.Array:
    """Scores of every visible (query, key) pair -> f32 [B, T, S].

    q [B, T, Hi, Di] (bf16 or f32), w [B, T, Hi], k [B, S, Di]; qpos/qseg int32 [B, T], kpos/kseg
    int32 [B, S] (segment ids all equal when rows are not packed). `interpret` is False, True (HLO
    interpreter) or a `pltpu.InterpretParams` (TPU-faithful simulator).
    layer: with k a stacked cache [L, B, S, Di], the layer to read (scalar-prefetched into the key
    BlockSpec's index map, so the layer is read in place: no [B, S, Di] slice is materialised).
    """
    b, t, hi, di = q.shape
    s_len = k.shape[-2]
    bq = block_q if t >= block_q else t  # decode (T < 8): a block of the whole T, not T padded to 8
    bs = _key_block(s_len, block_k)
    tp, sp = _round_up(t, bq), _round_up(s_len, bs)
    pad_t, pad_s = ((0, 0), (0, tp - t)), ((0, 0), (0, sp - s_len))
    dt = jnp.promote_types(q.dtype, k.dtype)
    q = jnp.pad(q.astype(dt), pad_t + ((0, 0), (0, 0))).reshape(b, tp * hi, di)
    stacked = layer is not None
    if not stacked:
        k = k[None]
    if sp != s_len or k.dtype != dt:  # (a stacked cache: a copy, avoided whenever S is a multiple of 128)
        k = jnp.pad(k.astype(dt), ((0, 0),) + pad_s + ((0, 0),))
    w = jnp.pad(w.astype(F32), pad_t + ((0, 0),)).reshape(b, tp * hi, 1)
    qpos = jnp.pad(qpos, pad_t, constant_values=-1)
    kpos = jnp.pad(kpos, pad_s, constant_values=-1)
    qseg, kseg = jnp.pad(qseg, pad_t), jnp.pad(kseg, pad_s)
    nq, nk = tp // bq, sp // bs
    nblk = needed_key_blocks(qpos, kpos, bq, bs).reshape(-1)  # 1-D: SMEM pads 2-D arrays to 128 lanes

    def kmap(bi, i, j, nblk_ref, layer_ref):  # clamp: a repeated block index means no new DMA
        return layer_ref[0], bi, jnp.minimum(j, jnp.maximum(nblk_ref[bi * nq + i] - 1, 0)), 0

    def kvec_map(bi, i, j, nblk_ref, layer_ref):
        return bi, 0, jnp.minimum(j, jnp.maximum(nblk_ref[bi * nq + i] - 1, 0))

    row = lambda bi, i, j, n, lay: (bi, i, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, nq, nk),
        in_specs=[
            pl.BlockSpec((None, bq * hi, di), row),
            pl.BlockSpec((None, bq * hi, 1), row),
            pl.BlockSpec((None, None, bs, di), kmap),
            pl.BlockSpec((None, bq, 1), row),
            pl.BlockSpec((None, 1, bs), kvec_map),
            pl.BlockSpec((None, bq, 1), row),
            pl.BlockSpec((None, 1, bs), kvec_map),
        ],
        out_specs=pl.BlockSpec((None, bq, bs), lambda bi, i, j, n, lay: (bi, i, j)),
    )
    out = pl.pallas_call(
        functools.partial(_kernel, bq=bq, hi=hi, nq=nq),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, tp, sp), F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        # every tile counted (causal skipping roughly halves a prefill's); keys re-read per query block
        cost_estimate=pl.CostEstimate(
            flops=2 * b * tp * hi * di * sp, transcendentals=0,
            bytes_accessed=b * (tp * hi * (di * q.dtype.itemsize + 4) + nq * sp * di * k.dtype.itemsize + tp * sp * 4)),
        interpret=interpret,
        name="dsjax_indexer_scores",
    )(nblk, jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), q, w, k, qpos[..., None],
      kpos[:, None, :], qseg[..., None], kseg[:, None, :])
    return out[:, :t, :s_len]
