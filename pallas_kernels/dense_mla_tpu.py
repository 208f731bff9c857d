"""Dense (flash) causal MLA kernels for the TPU TensorCore (Pallas Mosaic): forward and backward.

The V3 / short-prefill / dense warm-up attention: MQA over every visible latent row, in O(T) memory.

Layout (what the real Mosaic compiler accepts on v5e / v5p / v6e; tests/test_tpu_compile.py):
  * rows = (token, head) pairs: [B, T, H, D] -> [B, T·H, D] and the lse [B, T, H] -> [B, 1, T·H] are free
    reshapes (no transposes). One grid step = `block_rows` rows (whole tokens, all H heads) against one key
    block of `block_k` rows, so each key block that arrives in VMEM serves every head of bq tokens (MQA:
    one latent row per key for all heads) in one [M, bk] matmul;
  * grid (B, T/bq, S/bk), the key axis innermost and sequential; f32 accumulators in VMEM scratch;
  * causal block skipping: the [lo, hi) key blocks of each query block (`dense_mla_common`) arrive by
    scalar prefetch. Outside them the step does nothing, and the key BlockSpec's index is clamped into
    the range, so a skipped step issues no DMA (the block index repeats);
  * visibility per tile from the positions / segment ids: keys as lane-dense [1, bk] rows, query rows as
    lane-dense [1, M] rows (one int32 per row) turned into [M, 1] columns in the kernel (no mask, no
    128-lane broadcast);
  * lse and the backward's delta travel as lane-dense f32 [B, 1, T·H] rows;
  * backward: a dQ kernel on the forward's grid, and a dK/dV kernel per key block whose sequential axis
    walks the query blocks that can see it ([qlo, qhi), likewise clamped). P is recomputed from lse; no
    atomics and no scatter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dense_mla_common as dmc
from pallas_kernels.sparse_mla_common import NEG, cdiv, dot_nn, dot_nt, finish_lse, pad_axis

F32, BF16 = jnp.float32, jnp.bfloat16


def supports(dc: int, dr: int) -> bool:
    """The value is the lane-aligned first Dc columns of the fused [Dc + Dr] key row: Dc % 128 == 0."""
    del dr
    return dc % 128 == 0


def tokens_per_block(h: int, rows: int) -> int:
    """Query tokens per block: about `rows` (token, head) rows, a multiple of 128 rows (the lse block is a
    lane-dense row of them)."""
    unit = math.lcm(h, 128)
    return unit // h * max(1, rows // unit)


def _col(row):
    """[1, n] -> [n, 1]."""
    return jnp.transpose(row)


class _Prepared:
    """Rows = (token, head) pairs: [B, T, H, D] -> [B, Tp·H, D] and [B, T, H] -> [B, 1, Tp·H] are free
    reshapes; per-row positions / segment ids are lane-dense [B, 1, Tp·H] rows."""

    def __init__(self, q_nope, q_rope, kv_nope, k_rope, vis, block_rows, block_k):
        b, t, h, _ = q_nope.shape
        s = kv_nope.shape[1]
        self.b, self.t, self.h, self.s = b, t, h, s
        self.bq = min(tokens_per_block(h, block_rows), cdiv(t, tokens_per_block(h, 128)) * tokens_per_block(h, 128))
        self.bm = self.bq * h
        self.bk = min(block_k, cdiv(s, 128) * 128)
        self.tp, self.sp = cdiv(t, self.bq) * self.bq, cdiv(s, self.bk) * self.bk
        qp, kp, qs, ks = dmc.visibility_inputs(*vis, b, t, s)
        self.qp, self.qs, self.kp, self.ks = dmc.pad_visibility(qp, qs, kp, ks, self.tp, self.sp)
        self.k = jnp.concatenate([pad_axis(x, 1, self.sp).astype(BF16) for x in (kv_nope, k_rope)], -1)

    def rows(self, x):
        """[B, T, H, D] -> bf16 [B, Tp·H, D]."""
        return pad_axis(x, 1, self.tp).astype(BF16).reshape(self.b, self.tp * self.h, x.shape[-1])

    def unrows(self, x, like):
        return x.reshape(self.b, self.tp, self.h, x.shape[-1])[:, :self.t].astype(like.dtype)

    def row_vec(self, x):
        """[B, T, H] -> f32 [B, 1, Tp·H]."""
        return pad_axis(x.astype(F32), 1, self.tp).reshape(self.b, 1, self.tp * self.h)

    def vis_rows(self):
        """Per-row query positions / segment ids [B, 1, Tp·H]; key ones [B, 1, Sp]."""
        rep = lambda x: jnp.repeat(x, self.h, axis=1)[:, None, :]
        return rep(self.qp), rep(self.qs), self.kp[:, None, :], self.ks[:, None, :]


def _visible(qpos_row, qseg_row, kpos_row, kseg_row):
    """Query rows [1, M] and key rows [1, bk] -> bool [M, bk]."""
    qp, qs = _col(qpos_row), _col(qseg_row)
    return (kpos_row <= qp) & (kpos_row >= 0) & (kseg_row == qs)


def _clamped(j, lo, hi):
    """Block index j clamped into [lo, hi) (repeating a block index skips its DMA)."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def _query_specs(bm, bk, n_qb):
    """BlockSpecs of the forward / dQ grid (b, qb, j): query rows, their vectors, keys clamped into range."""
    def kmap(i, qb, j, lo, hi):
        r = i * n_qb + qb
        return i, _clamped(j, lo[r], hi[r])

    q = lambda d: pl.BlockSpec((None, bm, d), lambda i, qb, j, lo, hi: (i, qb, 0))
    qvec = pl.BlockSpec((None, 1, bm), lambda i, qb, j, lo, hi: (i, 0, qb))
    k = lambda d: pl.BlockSpec((None, bk, d), lambda *a: (*kmap(*a), 0))
    kvec = pl.BlockSpec((None, 1, bk), lambda *a: (kmap(*a)[0], 0, kmap(*a)[1]))
    return q, qvec, k, kvec


# the default scoped-VMEM limit (16 MiB on v5e) is below what 256-row x 512-key tiles at Dc = 512 need; the
# TensorCores targeted have 95-128 MiB of VMEM
_PARAMS = dict(vmem_limit_bytes=48 * 2**20)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(lo_ref, hi_ref, qn_ref, qr_ref, qpos_ref, qseg_ref, k_ref, kpos_ref, kseg_ref, o_ref, lse_ref,
                acc_ref, m_ref, l_ref, *, scale, n_qb, dc):
    b, qb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = b * n_qb + qb
    lo, hi = lo_ref[r], hi_ref[r]

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
        m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)

    @pl.when((j >= lo) & (j < hi))
    def _():
        k = k_ref[...]
        s = (dot_nt(qn_ref[...], k[:, :dc]) + dot_nt(qr_ref[...], k[:, dc:])) * scale  # [M, bk]
        s = jnp.where(_visible(qpos_ref[...], qseg_ref[...], kpos_ref[...], kseg_ref[...]), s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # stays finite (NEG)
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + dot_nn(p.astype(k.dtype), k[:, :dc])
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        l = l_ref[...]
        nonempty = l > 0
        l_safe = jnp.where(nonempty, l, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.transpose(jnp.where(nonempty, m_ref[...] + jnp.log(l_safe), -jnp.inf))


def _cost(pr, dc, dr, backward=False):
    """For XLA's scheduler, assuming causal self-attention (about half the (query, key) pairs visited): FLOPs
    (Q.K^T over Dc + Dr and P.V over Dc; the backward recomputes Q.K^T and adds dP, dQ, dK, dV), exps, and
    the HBM bytes (queries and outputs once, one key block per visited block)."""
    pairs = pr.b * pr.tp * pr.h * pr.sp // 2
    per_pair = (3 * (dc + dr) + 2 * dc) if backward else ((dc + dr) + dc)
    q_bytes = pr.b * pr.tp * pr.h * (dc + dr + dc) * 2 * (2 if backward else 1)
    k_bytes = pr.b * pr.sp * (dc + dr) * 2 * max(1, pr.tp // pr.bq // 2)
    return pl.CostEstimate(flops=2 * pairs * per_pair, transcendentals=pairs, bytes_accessed=q_bytes + k_bytes)


def forward(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
            q_segment_ids=None, k_segment_ids=None, interpret=False, block_rows: int = 256, block_k: int = 512):
    """Dense causal MLA forward on TPU -> (out [B, T, H, Dc] in q_nope's dtype (bf16 compute, f32
    accumulation), lse f32 [B, T, H], +inf when a query sees no key). Semantics as `pallas_kernels.dense_mla`.
    block_rows: (token, head) rows per query block (rounded to whole tokens and 128 rows)."""
    b, t, h, dc = q_nope.shape
    dr = q_rope.shape[-1]
    if not supports(dc, dr):
        raise ValueError(f"the TPU dense MLA kernel needs Dc % 128 == 0 (got Dc={dc}); use backend='xla'.")
    pr = _Prepared(q_nope, q_rope, kv_nope, k_rope, (q_positions, k_positions, q_segment_ids, k_segment_ids),
                   block_rows, block_k)
    bm, bk, d = pr.bm, pr.bk, dc + dr
    lo, hi = dmc.key_block_ranges(pr.qp, pr.qs, pr.kp, pr.ks, pr.bq, bk)
    n_qb, n_kb = pr.tp // pr.bq, pr.sp // bk
    qspec, qvec, kspec, kvec = _query_specs(bm, bk, n_qb)
    qpos, qseg, kpos, kseg = pr.vis_rows()
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=float(scale), n_qb=n_qb, dc=dc),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, n_qb, n_kb),
            in_specs=[qspec(dc), qspec(dr), qvec, qvec, kspec(d), kvec, kvec],
            out_specs=[qspec(dc), qvec],
            scratch_shapes=[pltpu.VMEM((bm, dc), F32), pltpu.VMEM((bm, 1), F32), pltpu.VMEM((bm, 1), F32)]),
        out_shape=[jax.ShapeDtypeStruct((b, pr.tp * h, dc), BF16), jax.ShapeDtypeStruct((b, 1, pr.tp * h), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), **_PARAMS),
        cost_estimate=_cost(pr, dc, dr),
        interpret=interpret,
        name="dense_mla_fwd_tpu",
    )(lo.reshape(-1), hi.reshape(-1), pr.rows(q_nope), pr.rows(q_rope), qpos, qseg, pr.k, kpos, kseg)
    lse = lse.reshape(b, pr.tp, h)[:, :t]
    return pr.unrows(o, q_nope), finish_lse(lse)


# ----------------------------------------------------------------------------- backward
def _dq_kernel(lo_ref, hi_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, k_ref, kpos_ref,
               kseg_ref, dqn_ref, dqr_ref, dqn_acc, dqr_acc, *, scale, n_qb, dc):
    b, qb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = b * n_qb + qb
    lo, hi = lo_ref[r], hi_ref[r]

    @pl.when(j == 0)
    def _():
        dqn_acc[...] = jnp.zeros(dqn_acc.shape, F32)
        dqr_acc[...] = jnp.zeros(dqr_acc.shape, F32)

    @pl.when((j >= lo) & (j < hi))
    def _():
        k = k_ref[...]
        vis = _visible(qpos_ref[...], qseg_ref[...], kpos_ref[...], kseg_ref[...])
        lse, delta = _col(lse_ref[...]), _col(delta_ref[...])  # [M, 1]
        kn, kr = k[:, :dc], k[:, dc:]
        s = (dot_nt(qn_ref[...], kn) + dot_nt(qr_ref[...], kr)) * scale
        p = jnp.where(vis, jnp.exp(s - lse), 0.0)  # lse = +inf for a query that sees nothing: P = 0
        ds = (p * (dot_nt(do_ref[...], kn) - delta)).astype(k.dtype)
        dqn_acc[...] = dqn_acc[...] + dot_nn(ds, kn)
        dqr_acc[...] = dqr_acc[...] + dot_nn(ds, kr)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        dqn_ref[...] = (dqn_acc[...] * scale).astype(dqn_ref.dtype)
        dqr_ref[...] = (dqr_acc[...] * scale).astype(dqr_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, k_ref, kpos_ref, kseg_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                qseg_ref, dk_ref, dkn_acc, dkr_acc, *, scale, n_kb, dc):
    b, kb, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = b * n_kb + kb
    lo, hi = lo_ref[r], hi_ref[r]

    @pl.when(i == 0)
    def _():
        dkn_acc[...] = jnp.zeros(dkn_acc.shape, F32)
        dkr_acc[...] = jnp.zeros(dkr_acc.shape, F32)

    @pl.when((i >= lo) & (i < hi))
    def _():
        k, qn, qr, do = k_ref[...], qn_ref[...], qr_ref[...], do_ref[...]
        kn, kr = k[:, :dc], k[:, dc:]
        # transposed tile [bk, M]: the keys own the rows, so the dK/dV sums are plain matmuls
        kp, ks = _col(kpos_ref[...]), _col(kseg_ref[...])
        vis = (kp <= qpos_ref[...]) & (kp >= 0) & (ks == qseg_ref[...])
        st = (dot_nt(kn, qn) + dot_nt(kr, qr)) * scale
        p = jnp.where(vis, jnp.exp(st - lse_ref[...]), 0.0)
        ds = (p * (dot_nt(kn, do) - delta_ref[...])).astype(qn.dtype)
        dkn_acc[...] = dkn_acc[...] + dot_nn(ds, qn) * scale + dot_nn(p.astype(do.dtype), do)
        dkr_acc[...] = dkr_acc[...] + dot_nn(ds, qr) * scale

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        dk_ref[:, :dc] = dkn_acc[...]
        dk_ref[:, dc:] = dkr_acc[...]


def backward(q_nope, q_rope, kv_nope, k_rope, out, lse, dout, dlse, *, scale: float, q_positions=None,
             k_positions=None, q_segment_ids=None, k_segment_ids=None, interpret=False, block_rows: int = 256,
             block_k: int = 512, dkv_block_rows: int = 256, dkv_block_k: int = 256):
    """Gradients of `forward` -> (dq_nope, dq_rope, dkv_nope, dk_rope), each in its input's dtype.

    out/lse: the forward's results; dout [B, T, H, Dc], dlse f32 [B, T, H]: their cotangents.
    With P = exp(S - lse): dS = P * (dO.V^T - rowsum(dO * O) + dlse)."""
    b, t, h, dc = q_nope.shape
    dr = q_rope.shape[-1]
    d = dc + dr
    s_len = kv_nope.shape[1]
    vis = (q_positions, k_positions, q_segment_ids, k_segment_ids)
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)  # [B, T, H]
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), **_PARAMS)

    # dQ: the forward's grid
    pr = _Prepared(q_nope, q_rope, kv_nope, k_rope, vis, block_rows, block_k)
    bm, bk = pr.bm, pr.bk
    n_qb, n_kb = pr.tp // pr.bq, pr.sp // bk
    lo, hi = dmc.key_block_ranges(pr.qp, pr.qs, pr.kp, pr.ks, pr.bq, bk)
    qspec, qvec, kspec, kvec = _query_specs(bm, bk, n_qb)
    qpos, qseg, kpos, kseg = pr.vis_rows()
    qn, qr, do = pr.rows(q_nope), pr.rows(q_rope), pr.rows(dout)
    lse_r, delta_r = pr.row_vec(lse), pr.row_vec(delta)
    dqn, dqr = pl.pallas_call(
        functools.partial(_dq_kernel, scale=float(scale), n_qb=n_qb, dc=dc),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, n_qb, n_kb),
            in_specs=[qspec(dc), qspec(dr), qspec(dc), qvec, qvec, qvec, qvec, kspec(d), kvec, kvec],
            out_specs=[qspec(dc), qspec(dr)],
            scratch_shapes=[pltpu.VMEM((bm, dc), F32), pltpu.VMEM((bm, dr), F32)]),
        out_shape=[jax.ShapeDtypeStruct(qn.shape, BF16), jax.ShapeDtypeStruct(qr.shape, BF16)],
        compiler_params=params, cost_estimate=_cost(pr, dc, dr, backward=True),
        interpret=interpret, name="dense_mla_dq_tpu",
    )(lo.reshape(-1), hi.reshape(-1), qn, qr, do, lse_r, delta_r, qpos, qseg, pr.k, kpos, kseg)

    # dK, dV: one key block per (b, kb); the sequential axis walks the query blocks that can see it
    p2 = _Prepared(q_nope, q_rope, kv_nope, k_rope, vis, dkv_block_rows, dkv_block_k)
    bm2, bk2 = p2.bm, p2.bk
    n_qb2, n_kb2 = p2.tp // p2.bq, p2.sp // bk2
    qlo, qhi = dmc.query_block_ranges(p2.qp, p2.qs, p2.kp, p2.ks, p2.bq, bk2)

    def qmap(i, kb, qb, lo, hi):
        r = i * n_kb2 + kb
        return i, _clamped(qb, lo[r], hi[r])

    kspec2 = lambda dd: pl.BlockSpec((None, bk2, dd), lambda i, kb, qb, lo, hi: (i, kb, 0))
    kvec2 = pl.BlockSpec((None, 1, bk2), lambda i, kb, qb, lo, hi: (i, 0, kb))
    qspec2 = lambda dd: pl.BlockSpec((None, bm2, dd), lambda *a: (*qmap(*a), 0))
    qvec2 = pl.BlockSpec((None, 1, bm2), lambda *a: (qmap(*a)[0], 0, qmap(*a)[1]))
    same = p2.tp == pr.tp and p2.sp == pr.sp
    qn2, qr2, do2 = (qn, qr, do) if same else (p2.rows(q_nope), p2.rows(q_rope), p2.rows(dout))
    lse2, delta2 = (lse_r, delta_r) if same else (p2.row_vec(lse), p2.row_vec(delta))
    qpos2, qseg2, kpos2, kseg2 = p2.vis_rows()
    dk = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=float(scale), n_kb=n_kb2, dc=dc),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, n_kb2, n_qb2),
            in_specs=[kspec2(d), kvec2, kvec2, qspec2(dc), qspec2(dr), qspec2(dc), qvec2, qvec2, qvec2, qvec2],
            out_specs=kspec2(d), scratch_shapes=[pltpu.VMEM((bk2, dc), F32), pltpu.VMEM((bk2, dr), F32)]),
        out_shape=jax.ShapeDtypeStruct((b, p2.sp, d), F32),
        compiler_params=params, cost_estimate=_cost(p2, dc, dr, backward=True),
        interpret=interpret, name="dense_mla_dkv_tpu",
    )(qlo.reshape(-1), qhi.reshape(-1), p2.k, kpos2, kseg2, qn2, qr2, do2, lse2, delta2, qpos2, qseg2)
    return (pr.unrows(dqn, q_nope), pr.unrows(dqr, q_rope), dk[:, :s_len, :dc].astype(kv_nope.dtype),
            dk[:, :s_len, dc:].astype(k_rope.dtype))
