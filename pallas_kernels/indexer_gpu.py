"""Lightning-indexer scores as a Pallas GPU kernel lowered through Triton.

    I[b, t, s] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, s])       (f32, -inf where s is not visible)

Grid (B, T/bq, S/bs), one (query block × key block) tile per program, DeepGEMM's `fp8_mqa_logits`
shape (notes §2.5, §4.4): bq = 128 / Hi queries, so the bq·Hi = 128 query-head rows are one tensor-core
M dimension, against bs keys. ReLU, the per-head weight and the sum over heads happen in registers on
the [bq·Hi, bs] f32 accumulator; only the [bq, bs] f32 logits are written. A program whose keys are all
in the future of (or padding for) every query of its block writes -inf without loading q or k.

Triton needs power-of-two array sizes (pitfall §6.3) and tensor-core dots need M, N, K >= 16, so the
wrapper pads Hi (with zero weights: the padded heads contribute w·ReLU(.) = 0) and Di (with zeros: the
dot products are unchanged) to powers of two >= 16. `compiler_params=pltriton.CompilerParams(...)` selects
the Triton lowering; JAX 0.10 would otherwise lower a GPU `pallas_call` with Mosaic GPU (pitfall §6.2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
NEG_INF = float("-inf")
_INT_MAX = int(jnp.iinfo(jnp.int32).max)


def _pow2_at_least(x: int, lo: int = 1) -> int:
    return max(lo, 1 << (max(1, x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _kernel(q_ref, w_ref, k_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, o_ref, *, bq, hi):
    qp, kp = qpos_ref[...], kpos_ref[...]  # [bq], [bs]
    k_min = jnp.min(jnp.where(kp >= 0, kp, _INT_MAX))
    needed = k_min <= jnp.max(qp)

    @pl.when(needed)
    def _compute():
        s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=F32)  # [bq·Hi, bs]
        s = jnp.maximum(s, 0.0) * w_ref[...][:, None]
        sc = jnp.sum(s.reshape(bq, hi, s.shape[-1]), axis=1)  # [bq, bs]
        vis = (kp[None, :] <= qp[:, None]) & (kp[None, :] >= 0) & (qseg_ref[...][:, None] == kseg_ref[...][None, :])
        o_ref[...] = jnp.where(vis, sc, NEG_INF)

    @pl.when(jnp.logical_not(needed))
    def _skip():
        o_ref[...] = jnp.full(o_ref.shape, NEG_INF, F32)


@functools.partial(jax.jit, static_argnames=("block_k", "num_warps", "num_stages", "interpret"))
def indexer_scores_gpu(q, w, k, qpos, kpos, qseg, kseg, *, block_k: int = 64, num_warps: int = 4,
                       num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Scores of every visible (query, key) pair -> f32 [B, T, S].

    q [B, T, Hi, Di] (bf16 or f32), w [B, T, Hi], k [B, S, Di]; qpos/qseg int32 [B, T], kpos/kseg
    int32 [B, S] (segment ids all equal when rows are not packed).
    """
    b, t, hi, di = q.shape
    s_len = k.shape[1]
    hp, dp = _pow2_at_least(hi, 16), _pow2_at_least(di, 16)
    bq = max(1, 128 // hp)
    bs = _pow2_at_least(min(block_k, s_len), 16)
    tp, sp = _round_up(t, bq), _round_up(s_len, bs)
    dt = jnp.promote_types(q.dtype, k.dtype)
    q = jnp.pad(q.astype(dt), ((0, 0), (0, tp - t), (0, hp - hi), (0, dp - di))).reshape(b, tp * hp, dp)
    w = jnp.pad(w.astype(F32), ((0, 0), (0, tp - t), (0, hp - hi))).reshape(b, tp * hp)
    k = jnp.pad(k.astype(dt), ((0, 0), (0, sp - s_len), (0, dp - di)))
    pad_t, pad_s = ((0, 0), (0, tp - t)), ((0, 0), (0, sp - s_len))
    qpos = jnp.pad(qpos, pad_t, constant_values=-1)
    kpos = jnp.pad(kpos, pad_s, constant_values=-1)
    qseg, kseg = jnp.pad(qseg, pad_t), jnp.pad(kseg, pad_s)
    qmap = lambda bi, i, j: (bi, i)
    kmap = lambda bi, i, j: (bi, j)
    out = pl.pallas_call(
        functools.partial(_kernel, bq=bq, hi=hp),
        grid=(b, tp // bq, sp // bs),
        in_specs=[
            pl.BlockSpec((None, bq * hp, dp), lambda bi, i, j: (bi, i, 0)),
            pl.BlockSpec((None, bq * hp), qmap),
            pl.BlockSpec((None, bs, dp), lambda bi, i, j: (bi, j, 0)),
            pl.BlockSpec((None, bq), qmap),
            pl.BlockSpec((None, bs), kmap),
            pl.BlockSpec((None, bq), qmap),
            pl.BlockSpec((None, bs), kmap),
        ],
        out_specs=pl.BlockSpec((None, bq, bs), lambda bi, i, j: (bi, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, tp, sp), F32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dsjax_indexer_scores",
    )(q, w, k, qpos, kpos, qseg, kseg)
    return out[:, :t, :s_len]
