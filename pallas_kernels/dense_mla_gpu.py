"""Dense (flash) causal MLA kernels for GPU, lowered by Pallas-Triton: forward and backward.

The V3 / short-prefill / dense warm-up attention: MQA over every visible latent row, in O(T) memory.

Design:
  * rows = (token, head) pairs. The wrapper lays the queries out as [B, H/bh, T·bh, D] (a head block's
    tokens one after another, bh heads each), so one program's M = `block_m` rows are bq = block_m / bh
    tokens x bh heads, and every key row it loads serves all of them (MQA: one latent row per key);
  * online softmax over key blocks of `block_k` rows (base 2, the scale folded into log2 e). Visibility is
    evaluated per tile from per-row positions / segment ids (`dense_mla_common`): never a mask array;
  * causal block skipping: each program walks only the key blocks [lo, hi) that can hold a visible pair
    (`dense_mla_common.key_block_ranges`), the flash-attention diagonal for causal self-attention;
  * backward without atomics: one kernel owns dQ per query block (walks [lo, hi)), one owns dK/dV per key
    block (walks the head blocks and the query blocks that can see it). P is recomputed from the saved lse.

Nope (Dc) and rope (Dr) parts stay separate arrays (Triton needs power-of-two sizes; the value is the nope
part). Heads are zero-padded to a multiple of bh and Dc/Dr to powers of two, which changes nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dense_mla_common as dmc
from pallas_kernels.sparse_mla_common import LN2, LOG2E, NEG, cdiv, dot_nn, dot_nt, finish_lse, next_pow2, \
    pad_axis

F32 = jnp.float32


class _Layout:
    """Row layout: [B, T, H, D] <-> [B, H/bh, Tp·bh, D], with bh | block_m, powers of two."""

    def __init__(self, t, h, dc, dr, block_m):
        self.t, self.h, self.dc, self.dr = t, h, dc, dr
        self.bh = min(block_m, max(1, next_pow2(h)))
        self.bq = block_m // self.bh  # tokens per program
        self.nhb = cdiv(h, self.bh)
        self.hp = self.nhb * self.bh
        self.tp = cdiv(t, self.bq) * self.bq
        self.dcp, self.drp = max(16, next_pow2(dc)), max(16, next_pow2(dr))

    def rows(self, x, d):
        """[B, T, H, D] -> [B, nhb, Tp·bh, dp]."""
        b = x.shape[0]
        x = pad_axis(pad_axis(pad_axis(x, 1, self.tp), 2, self.hp), 3, d)
        x = x.reshape(b, self.tp, self.nhb, self.bh, d).transpose(0, 2, 1, 3, 4)
        return x.reshape(b, self.nhb, self.tp * self.bh, d)

    def rows_vec(self, x):
        """[B, T, H] -> [B, nhb, Tp·bh]."""
        return self.rows(x[..., None], 1)[..., 0]

    def unrows(self, x, d):
        """[B, nhb, Tp·bh, dp] -> [B, T, H, d]."""
        b = x.shape[0]
        x = x.reshape(b, self.nhb, self.tp, self.bh, x.shape[-1]).transpose(0, 2, 1, 3, 4)
        return x.reshape(b, self.tp, self.hp, x.shape[-1])[:, :self.t, :self.h, :d]

    def unrows_vec(self, x):
        return self.unrows(x[..., None], 1)[..., 0]

    def token_rows(self, x):
        """Per-token int [B, Tp] -> per-row [B, Tp·bh] (row r is token r // bh)."""
        return jnp.repeat(x, self.bh, axis=1)


def _prepare(q_nope, q_rope, kv_nope, k_rope, vis, block_m, block_k):
    b, t, h, dc = q_nope.shape
    s = kv_nope.shape[1]
    lay = _Layout(t, h, dc, q_rope.shape[-1], block_m)
    sp = cdiv(s, block_k) * block_k
    qp, kp, qs, ks = dmc.visibility_inputs(*vis, b, t, s)
    qp, qs, kp, ks = dmc.pad_visibility(qp, qs, kp, ks, lay.tp, sp)
    kvn = pad_axis(pad_axis(kv_nope, 1, sp), 2, lay.dcp)
    kr = pad_axis(pad_axis(k_rope, 1, sp), 2, lay.drp)
    return lay, (qp, qs, kp, ks), kvn, kr


def _visible(qpos, qseg, kpos, kseg):
    """Row [M] x key [N] -> bool [M, N]."""
    return (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0) & (kseg[None, :] == qseg[:, None])


def _keys(kvn_ref, kr_ref, kpos_ref, kseg_ref, j, block_k):
    sl = pl.ds(j * block_k, block_k)
    return kvn_ref[sl, :], kr_ref[sl, :], kpos_ref[sl], kseg_ref[sl]


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(qn_ref, qr_ref, qpos_ref, qseg_ref, lo_ref, hi_ref, kvn_ref, kr_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, *, scale, block_k):
    qn, qr, qpos, qseg = qn_ref[...], qr_ref[...], qpos_ref[...], qseg_ref[...]
    bm, dc = qn.shape
    c_scale = scale * LOG2E

    def body(j, carry):
        acc, m, l = carry
        kn, kr, kpos, kseg = _keys(kvn_ref, kr_ref, kpos_ref, kseg_ref, j, block_k)
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * c_scale
        s = jnp.where(_visible(qpos, qseg, kpos, kseg), s, -jnp.inf)  # m stays finite (NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(kn.dtype), kn)
        return acc, m_new, l

    init = (jnp.zeros((bm, dc), F32), jnp.full((bm,), NEG, F32), jnp.zeros((bm,), F32))
    acc, m, l = lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    nonempty = l > 0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(jnp.where(nonempty, l, 1.0))) * LN2, -jnp.inf)


def forward(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
            q_segment_ids=None, k_segment_ids=None, interpret=False, block_m: int = 32, block_k: int = 64,
            num_warps: int = 8, num_stages: int = 2):
    """Dense causal MLA forward on GPU -> (out [B, T, H, Dc] in q_nope's dtype, lse f32 [B, T, H], +inf when
    a query sees no key). Shapes and visibility as `pallas_kernels.dense_mla`.

    Tiles (experiments/gpu_compile.py, H = 128, Dc = 512): 32 rows (1 token x 32 heads) x 64 keys."""
    b = q_nope.shape[0]
    vis = (q_positions, k_positions, q_segment_ids, k_segment_ids)
    lay, (qp, qs, kp, ks), kvn, kr = _prepare(q_nope, q_rope, kv_nope, k_rope, vis, block_m, block_k)
    lo, hi = dmc.key_block_ranges(qp, qs, kp, ks, lay.bq, block_k)
    sp = kvn.shape[1]
    nqb = lay.tp // lay.bq
    row = lambda d: pl.BlockSpec((None, None, block_m, d), lambda i, hb, qb: (i, hb, qb, 0))
    row_vec = pl.BlockSpec((None, block_m), lambda i, hb, qb: (i, qb))
    scalar = pl.BlockSpec((None, None), lambda i, hb, qb: (i, qb))
    whole = lambda d: pl.BlockSpec((None, sp, d), lambda i, hb, qb: (i, 0, 0))
    whole_vec = pl.BlockSpec((None, sp), lambda i, hb, qb: (i, 0))
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=float(scale), block_k=block_k),
        grid=(b, lay.nhb, nqb),
        in_specs=[row(lay.dcp), row(lay.drp), row_vec, row_vec, scalar, scalar, whole(lay.dcp), whole(lay.drp),
                  whole_vec, whole_vec],
        out_specs=[row(lay.dcp), pl.BlockSpec((None, None, block_m), lambda i, hb, qb: (i, hb, qb))],
        out_shape=[jax.ShapeDtypeStruct((b, lay.nhb, lay.tp * lay.bh, lay.dcp), q_nope.dtype),
                   jax.ShapeDtypeStruct((b, lay.nhb, lay.tp * lay.bh), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dense_mla_fwd_gpu",
    )(lay.rows(q_nope, lay.dcp), lay.rows(q_rope, lay.drp), lay.token_rows(qp), lay.token_rows(qs), lo, hi,
      kvn, kr, kp, ks)
    return lay.unrows(o, lay.dc), finish_lse(lay.unrows_vec(lse))


# ----------------------------------------------------------------------------- backward
def _dq_kernel(qn_ref, qr_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, lo_ref, hi_ref, kvn_ref, kr_ref,
               kpos_ref, kseg_ref, dqn_ref, dqr_ref, *, scale, block_k):
    qn, qr, do, qpos, qseg = qn_ref[...], qr_ref[...], do_ref[...], qpos_ref[...], qseg_ref[...]
    lse2 = lse_ref[...] * LOG2E  # +inf for a query that sees nothing: P = 0
    delta = delta_ref[...]
    c_scale = scale * LOG2E

    def body(j, carry):
        dqn, dqr = carry
        kn, kr, kpos, kseg = _keys(kvn_ref, kr_ref, kpos_ref, kseg_ref, j, block_k)
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * c_scale
        p = jnp.where(_visible(qpos, qseg, kpos, kseg), jnp.exp2(s - lse2[:, None]), 0.0)
        ds = (p * (dot_nt(do, kn) - delta[:, None])).astype(kn.dtype)
        return dqn + dot_nn(ds, kn), dqr + dot_nn(ds, kr)

    dqn, dqr = lax.fori_loop(lo_ref[()], hi_ref[()], body, (jnp.zeros(qn.shape, F32), jnp.zeros(qr.shape, F32)))
    dqn_ref[...] = (dqn * scale).astype(dqn_ref.dtype)
    dqr_ref[...] = (dqr * scale).astype(dqr_ref.dtype)


def _dkv_kernel(kvn_ref, kr_ref, kpos_ref, kseg_ref, lo_ref, hi_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref,
                qpos_ref, qseg_ref, dkn_ref, dkr_ref, *, scale, block_m, n_head_blocks):
    kn, kr, kpos, kseg = kvn_ref[...], kr_ref[...], kpos_ref[...], kseg_ref[...]
    c_scale = scale * LOG2E
    lo, hi = lo_ref[()], hi_ref[()]

    def head_block(hb, carry):
        def body(i, carry):
            dkn, dkr = carry
            sl = pl.ds(i * block_m, block_m)
            qn, qr, do = qn_ref[hb, sl, :], qr_ref[hb, sl, :], do_ref[hb, sl, :]
            lse2, delta = lse_ref[hb, sl] * LOG2E, delta_ref[hb, sl]
            # transposed tile [bk, M]: keys own the rows, so the dK/dV sums are plain matmuls
            st = (dot_nt(kn, qn) + dot_nt(kr, qr)) * c_scale
            vis = (kpos[:, None] <= qpos_ref[sl][None, :]) & (kpos[:, None] >= 0) & (
                kseg[:, None] == qseg_ref[sl][None, :])
            p = jnp.where(vis, jnp.exp2(st - lse2[None, :]), 0.0)
            ds = (p * (dot_nt(kn, do) - delta[None, :])).astype(qn.dtype)
            dkn = dkn + dot_nn(ds, qn) * scale + dot_nn(p.astype(do.dtype), do)
            return dkn, dkr + dot_nn(ds, qr) * scale

        return lax.fori_loop(lo, hi, body, carry)

    init = (jnp.zeros(kn.shape, F32), jnp.zeros(kr.shape, F32))
    dkn, dkr = lax.fori_loop(0, n_head_blocks, head_block, init)
    dkn_ref[...] = dkn.astype(dkn_ref.dtype)
    dkr_ref[...] = dkr.astype(dkr_ref.dtype)


def backward(q_nope, q_rope, kv_nope, k_rope, out, lse, dout, dlse, *, scale: float, q_positions=None,
             k_positions=None, q_segment_ids=None, k_segment_ids=None, interpret=False, block_m: int = 32,
             block_k: int = 32, dkv_block_k: int = 32, num_warps: int = 8, num_stages: int = 1):
    """Gradients of `forward` -> (dq_nope, dq_rope, dkv_nope, dk_rope), each in its input's dtype.

    out/lse: the forward's results; dout [B, T, H, Dc], dlse f32 [B, T, H]: their cotangents.
    With P = exp(S - lse): dS = P * (dO.V^T - rowsum(dO * O) + dlse)."""
    b, t, h, dc = q_nope.shape
    s_len = kv_nope.shape[1]
    vis = (q_positions, k_positions, q_segment_ids, k_segment_ids)
    bk = max(block_k, dkv_block_k)  # one key padding serves both kernels
    lay, (qp, qs, kp, ks), kvn, kr = _prepare(q_nope, q_rope, kv_nope, k_rope, vis, block_m, bk)
    sp = kvn.shape[1]
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)  # [B, T, H]
    qn, qr, do = lay.rows(q_nope, lay.dcp), lay.rows(q_rope, lay.drp), lay.rows(dout.astype(q_nope.dtype), lay.dcp)
    lse_r = lay.rows_vec(lse.astype(F32))  # +inf for a query that sees nothing
    delta_r = lay.rows_vec(delta)
    qpos_r, qseg_r = lay.token_rows(qp), lay.token_rows(qs)
    nqb = lay.tp // lay.bq
    rows_total = lay.tp * lay.bh
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)

    # dQ: the forward's grid
    lo, hi = dmc.key_block_ranges(qp, qs, kp, ks, lay.bq, block_k)
    row = lambda d: pl.BlockSpec((None, None, block_m, d), lambda i, hb, qb: (i, hb, qb, 0))
    row_v = pl.BlockSpec((None, None, block_m), lambda i, hb, qb: (i, hb, qb))
    tok_v = pl.BlockSpec((None, block_m), lambda i, hb, qb: (i, qb))
    scalar = pl.BlockSpec((None, None), lambda i, hb, qb: (i, qb))
    whole = lambda d: pl.BlockSpec((None, sp, d), lambda i, hb, qb: (i, 0, 0))
    whole_v = pl.BlockSpec((None, sp), lambda i, hb, qb: (i, 0))
    dqn, dqr = pl.pallas_call(
        functools.partial(_dq_kernel, scale=float(scale), block_k=block_k),
        grid=(b, lay.nhb, nqb),
        in_specs=[row(lay.dcp), row(lay.drp), row(lay.dcp), row_v, row_v, tok_v, tok_v, scalar, scalar,
                  whole(lay.dcp), whole(lay.drp), whole_v, whole_v],
        out_specs=[row(lay.dcp), row(lay.drp)],
        out_shape=[jax.ShapeDtypeStruct(qn.shape, q_nope.dtype), jax.ShapeDtypeStruct(qr.shape, q_rope.dtype)],
        compiler_params=params, interpret=interpret, name="dense_mla_dq_gpu",
    )(qn, qr, do, lse_r, delta_r, qpos_r, qseg_r, lo, hi, kvn, kr, kp, ks)

    # dK, dV: one program per key block, over every head block and the query blocks that can see it
    bk2 = dkv_block_k
    qlo, qhi = dmc.query_block_ranges(qp, qs, kp, ks, lay.bq, bk2)
    key = lambda d: pl.BlockSpec((None, bk2, d), lambda i, kb: (i, kb, 0))
    key_v = pl.BlockSpec((None, bk2), lambda i, kb: (i, kb))
    kscalar = pl.BlockSpec((None, None), lambda i, kb: (i, kb))
    allq = lambda d: pl.BlockSpec((None, lay.nhb, rows_total, d), lambda i, kb: (i, 0, 0, 0))
    allq_v = pl.BlockSpec((None, lay.nhb, rows_total), lambda i, kb: (i, 0, 0))
    alltok = pl.BlockSpec((None, rows_total), lambda i, kb: (i, 0))
    dkn, dkr = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=float(scale), block_m=block_m, n_head_blocks=lay.nhb),
        grid=(b, sp // bk2),
        in_specs=[key(lay.dcp), key(lay.drp), key_v, key_v, kscalar, kscalar, allq(lay.dcp), allq(lay.drp),
                  allq(lay.dcp), allq_v, allq_v, alltok, alltok],
        out_specs=[key(lay.dcp), key(lay.drp)],
        out_shape=[jax.ShapeDtypeStruct(kvn.shape, F32), jax.ShapeDtypeStruct(kr.shape, F32)],
        compiler_params=params, interpret=interpret, name="dense_mla_dkv_gpu",
    )(kvn, kr, kp, ks, qlo, qhi, qn, qr, do, lse_r, delta_r, qpos_r, qseg_r)
    return (lay.unrows(dqn, dc), lay.unrows(dqr, lay.dr), dkn[:, :s_len, :dc].astype(kv_nope.dtype),
            dkr[:, :s_len, :lay.dr].astype(k_rope.dtype))
