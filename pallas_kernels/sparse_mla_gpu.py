"""Sparse MLA (DSA) kernels for GPU, lowered by Pallas-Triton: forward (prefill and split-K decode) and backward.

Design (pallas_dsa_notes.md §4.3, §4.6):
  * one program = one query token x a block of `block_h` heads; the heads are the M dimension of both
    matmuls, so every gathered latent row is loaded once and used by all heads of the block;
  * the top-k list is walked in chunks of `block_k` slots with an online softmax (base 2, the scale folded
    into log2 e); rows are gathered by pointer (`kv_ref[idx_vec, :]`) from whole-array BlockSpecs,
    which in Triton copy nothing;
  * nope (Dc) and rope (Dr) parts stay separate arrays: Triton needs power-of-two sizes and has no value
    slices, and the value is the nope part itself;
  * decode (few query tokens): the top-k list is split over a fourth grid axis (split-K) so that small
    batches still fill the GPU; partials are merged with their log-sum-exp (`combine_splits`);
  * backward: the same grid; P is recomputed from the saved lse, dQ is owned by the program (no races),
    and the per-slot dK/dV rows are scatter-added into an fp32 dKV with `pltriton.atomic_add`.

Duplicate indices within one query are counted twice (as the XLA gather does); in interpret mode the
atomic scatter of the backward is emulated by a gather/set that keeps one of two duplicate rows of a chunk,
so interpret-mode gradients assume distinct indices per query (the indexer's top-k is distinct).

JAX 0.10 lowers GPU `pallas_call`s with Mosaic GPU by default; passing `pltriton.CompilerParams` selects
Triton. Shapes the kernel cannot take directly (heads not a multiple of the head block, non power-of-two
Dc/Dr) are zero-padded by the wrappers, which does not change the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_mla_common import LN2, LOG2E, NEG, cdiv, combine_splits, cost_estimate, dot_nn, \
    dot_nt, dot_tn, finish_lse, next_pow2, pad_axis, prepare_indices

F32 = jnp.float32
TARGET_PROGRAMS = 264  # 2 x the SM count of an H100/H200: split-K until the grid has about this many programs


def default_num_splits(programs: int, n_blocks: int) -> int:
    """Split-K factor: 1 for prefill-sized grids; for decode-sized grids (few query tokens x head blocks)
    enough splits of the top-k list to give about TARGET_PROGRAMS programs, at most one per chunk."""
    return max(1, min(n_blocks, TARGET_PROGRAMS // max(1, programs)))


def _gather(idx_ref, kvn_ref, kr_ref, c, block_k):
    """Chunk c of a query's slots: (valid [bk], row ids [bk], nope rows [bk, Dc], rope rows [bk, Dr])."""
    ids = idx_ref[pl.ds(c * block_k, block_k)]
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)
    return valid, safe, kvn_ref[safe, :], kr_ref[safe, :]


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(qn_ref, qr_ref, idx_ref, nck_ref, kvn_ref, kr_ref, o_ref, lse_ref, *, scale, block_k,
                chunks_per_split):
    lo = pl.program_id(3) * chunks_per_split
    hi = jnp.minimum(nck_ref[()], lo + chunks_per_split)
    qn, qr = qn_ref[...], qr_ref[...]
    bh, dc = qn.shape
    c_scale = scale * LOG2E

    def body(c, carry):
        acc, m, l = carry
        valid, _, kn, kr = _gather(idx_ref, kvn_ref, kr_ref, c, block_k)
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * c_scale
        s = jnp.where(valid[None, :], s, -jnp.inf)  # m stays finite, so exp2(-inf - m) = 0
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(kn.dtype), kn)
        return acc, m_new, l

    init = (jnp.zeros((bh, dc), F32), jnp.full((bh,), NEG, F32), jnp.zeros((bh,), F32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    nonempty = l > 0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(jnp.where(nonempty, l, 1.0))) * LN2, -jnp.inf)


class _Padded:
    """Zero-pads heads to a multiple of block_h and Dc/Dr to powers of two (>= 16, the tl.dot minimum)."""

    def __init__(self, q_nope, q_rope, block_h):
        self.h, self.dc, self.dr = q_nope.shape[2], q_nope.shape[3], q_rope.shape[3]
        self.block_h = block_h or min(64, max(16, next_pow2(self.h)))
        self.hp = cdiv(self.h, self.block_h) * self.block_h
        self.dcp, self.drp = max(16, next_pow2(self.dc)), max(16, next_pow2(self.dr))

    def q(self, x, d):
        return pad_axis(pad_axis(x, 2, self.hp), 3, d)

    def kv(self, x, d):
        return pad_axis(x, 2, d)


def forward(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, interpret=False, block_h: int | None = None,
            block_k: int | None = None, num_splits: int | None = None, num_warps: int = 8, num_stages: int = 2):
    """Sparse MLA forward on GPU -> (out [B, T, H, Dc] in q_nope's dtype, lse f32 [B, T, H], +inf if empty).

    Shapes and semantics as `pallas_kernels.sparse_mla`. num_splits: split-K factor over the top-k list
    (None: 1 for prefill, enough to fill the GPU for decode-like grids).
    """
    b, t, h, dc = q_nope.shape
    s_len = kv_nope.shape[1]
    # 32 heads per program (experiments/gpu_compile.py, H = 128, Dc = 512, bk = 64, 8 warps, 2 stages): 114,944 B
    # of shared memory, 255 registers and 8-16 B of spills on sm_90 / sm_100. 64 heads (FlashMLA's block) hold a
    # [64, 512] f32 accumulator: 580-1,184 B of spills, since Pallas-Triton cannot split the 512-wide value over
    # two warpgroups sharing P as FlashMLA does. The price of 32: each gathered row is read by 4 programs, not 2.
    pd = _Padded(q_nope, q_rope, block_h or min(32, max(16, next_pow2(q_nope.shape[2]))))
    bh = pd.block_h
    block_k = block_k or 64
    idx, n_chunks = prepare_indices(indices, s_len, block_k)
    n_blocks = idx.shape[-1] // block_k
    nhb = pd.hp // bh
    cps = cdiv(n_blocks, num_splits or default_num_splits(b * t * nhb, n_blocks))
    num_splits = cdiv(n_blocks, cps)
    qn, qr = pd.q(q_nope, pd.dcp), pd.q(q_rope, pd.drp)
    kvn, kr = pd.kv(kv_nope, pd.dcp), pd.kv(k_rope, pd.drp)
    split = num_splits > 1
    o_dtype = F32 if split else q_nope.dtype
    kernel = functools.partial(_fwd_kernel, scale=float(scale), block_k=block_k, chunks_per_split=cps)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, t, nhb, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, bh, pd.dcp), lambda i, j, hb, sp: (i, j, hb, 0)),
            pl.BlockSpec((None, None, bh, pd.drp), lambda i, j, hb, sp: (i, j, hb, 0)),
            pl.BlockSpec((None, None, idx.shape[-1]), lambda i, j, hb, sp: (i, j, 0)),
            pl.BlockSpec((None, None), lambda i, j, hb, sp: (i, j)),
            pl.BlockSpec((None, s_len, pd.dcp), lambda i, j, hb, sp: (i, 0, 0)),
            pl.BlockSpec((None, s_len, pd.drp), lambda i, j, hb, sp: (i, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bh, pd.dcp), lambda i, j, hb, sp: (i, j, sp, hb, 0)),
            pl.BlockSpec((None, None, None, bh), lambda i, j, hb, sp: (i, j, sp, hb)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, t, num_splits, pd.hp, pd.dcp), o_dtype),
                   jax.ShapeDtypeStruct((b, t, num_splits, pd.hp), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost_estimate(b, t, pd.hp, idx.shape[-1], pd.dcp, pd.drp, kv_nope.dtype.itemsize,
                                    gathers=nhb),
        interpret=interpret,
        name="sparse_mla_fwd_gpu",
    )(qn, qr, idx, n_chunks, kvn, kr)
    if split:
        o, lse = combine_splits(o, lse, axis=2)
        o = o.astype(q_nope.dtype)
    else:
        o, lse = o[:, :, 0], lse[:, :, 0]
    return o[:, :, :h, :dc], finish_lse(lse[:, :, :h])


# ----------------------------------------------------------------------------- backward
def _bwd_kernel(qn_ref, qr_ref, idx_ref, nck_ref, kvn_ref, kr_ref, do_ref, lse_ref, delta_ref, _dkvn_in, _dkr_in,
                dqn_ref, dqr_ref, dkvn_ref, dkr_ref, *, scale, block_k):
    qn, qr, do = qn_ref[...], qr_ref[...], do_ref[...]
    c_scale = scale * LOG2E
    lse2 = lse_ref[...] * LOG2E  # +inf for an empty query: P = exp2(s - inf) = 0
    delta = delta_ref[...]
    s_len = kvn_ref.shape[0]
    cols_n = jnp.arange(kvn_ref.shape[1], dtype=jnp.int32)[None, :]
    cols_r = jnp.arange(kr_ref.shape[1], dtype=jnp.int32)[None, :]

    def body(c, carry):
        dqn, dqr = carry
        valid, safe, kn, kr = _gather(idx_ref, kvn_ref, kr_ref, c, block_k)
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * c_scale
        p = jnp.where(valid[None, :], jnp.exp2(s - lse2[:, None]), 0.0)  # [bh, bk]
        dp = dot_nt(do, kn)
        ds = p * (dp - delta[:, None])
        ds_c = ds.astype(kn.dtype)
        dqn = dqn + dot_nn(ds_c, kn)
        dqr = dqr + dot_nn(ds_c, kr)
        dkn = dot_tn(ds_c, qn) * scale + dot_tn(p.astype(do.dtype), do)  # [bk, Dc]
        dkr = dot_tn(ds_c, qr) * scale
        # Unused slots add their (zero) rows to trash rows S + j: distinct within the chunk, so the adds of
        # one chunk never collide, and the trash rows are sliced away by the wrapper.
        rows = jnp.where(valid, safe, s_len + jnp.arange(block_k, dtype=jnp.int32))[:, None]
        pltriton.atomic_add(dkvn_ref, (rows, cols_n), dkn)
        pltriton.atomic_add(dkr_ref, (rows, cols_r), dkr)
        return dqn, dqr

    init = (jnp.zeros(qn.shape, F32), jnp.zeros(qr.shape, F32))
    dqn, dqr = lax.fori_loop(0, nck_ref[()], body, init)
    dqn_ref[...] = (dqn * scale).astype(dqn_ref.dtype)
    dqr_ref[...] = (dqr * scale).astype(dqr_ref.dtype)


def backward(q_nope, q_rope, kv_nope, k_rope, indices, out, lse, dout, dlse, *, scale: float, interpret=False,
             block_h: int | None = None, block_k: int = 32, num_warps: int = 8, num_stages: int = 1):
    """Gradients of `forward` -> (dq_nope, dq_rope, dkv_nope, dk_rope), each in its input's dtype.

    out/lse: the forward's results; dout [B, T, H, Dc], dlse f32 [B, T, H]: their cotangents.
    With P = exp(S - lse): dS = P * (dO.V^T - rowsum(dO * O) + dlse).

    Tiles (experiments/gpu_compile.py, sm_90 / sm_100 at H = 128, Dc = 512): 32 heads x 32 slots per chunk
    need 135,168 B of shared memory and spill 12-40 B; 64 heads (the forward's block) need 311,296 B, over the
    232,448 B a block may use, so that backward could not launch. 32 heads x 16 slots: 102,400 B, 28-36 B spills.
    """
    b, t, h, dc = q_nope.shape
    s_len = kv_nope.shape[1]
    pd = _Padded(q_nope, q_rope, block_h or min(32, max(16, next_pow2(h))))
    bh = pd.block_h
    idx, n_chunks = prepare_indices(indices, s_len, block_k)
    nhb = pd.hp // bh
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)  # [B, T, H]
    qn, qr, do = pd.q(q_nope, pd.dcp), pd.q(q_rope, pd.drp), pd.q(dout, pd.dcp)
    kvn, kr = pd.kv(kv_nope, pd.dcp), pd.kv(k_rope, pd.drp)
    lse_p, delta_p = pad_axis(lse.astype(F32), 2, pd.hp), pad_axis(delta, 2, pd.hp)
    s_acc = s_len + block_k  # + trash rows for unused slots
    dkvn0 = jnp.zeros((b, s_acc, pd.dcp), F32)
    dkr0 = jnp.zeros((b, s_acc, pd.drp), F32)
    row = lambda d: pl.BlockSpec((None, None, bh, d), lambda i, j, hb: (i, j, hb, 0))
    vec = pl.BlockSpec((None, None, bh), lambda i, j, hb: (i, j, hb))
    whole = lambda n, d: pl.BlockSpec((None, n, d), lambda i, j, hb: (i, 0, 0))
    kernel = functools.partial(_bwd_kernel, scale=float(scale), block_k=block_k)
    dqn, dqr, dkvn, dkr = pl.pallas_call(
        kernel,
        grid=(b, t, nhb),
        in_specs=[row(pd.dcp), row(pd.drp),
                  pl.BlockSpec((None, None, idx.shape[-1]), lambda i, j, hb: (i, j, 0)),
                  pl.BlockSpec((None, None), lambda i, j, hb: (i, j)),
                  whole(s_len, pd.dcp), whole(s_len, pd.drp), row(pd.dcp), vec, vec,
                  whole(s_acc, pd.dcp), whole(s_acc, pd.drp)],
        out_specs=[row(pd.dcp), row(pd.drp), whole(s_acc, pd.dcp), whole(s_acc, pd.drp)],
        out_shape=[jax.ShapeDtypeStruct(qn.shape, q_nope.dtype), jax.ShapeDtypeStruct(qr.shape, q_rope.dtype),
                   jax.ShapeDtypeStruct(dkvn0.shape, F32), jax.ShapeDtypeStruct(dkr0.shape, F32)],
        input_output_aliases={9: 2, 10: 3},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost_estimate(b, t, pd.hp, idx.shape[-1], pd.dcp, pd.drp, kv_nope.dtype.itemsize,
                                    gathers=nhb, backward=True),
        interpret=interpret,
        name="sparse_mla_bwd_gpu",
    )(qn, qr, idx, n_chunks, kvn, kr, do, lse_p, delta_p, dkvn0, dkr0)
    return (dqn[:, :, :h, :dc], dqr[:, :, :h, :pd.dr], dkvn[:, :s_len, :dc].astype(kv_nope.dtype),
            dkr[:, :s_len, :pd.dr].astype(k_rope.dtype))
