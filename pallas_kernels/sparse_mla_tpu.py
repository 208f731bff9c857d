"""Sparse MLA (DSA) kernels for the TPU TensorCore (Pallas Mosaic): forward and backward.

Design (pallas_dsa_notes.md §4.1, §4.6, §6):
  * grid (B, T): one step = one query token x all H heads (M = H = 128 fills the MXU);
  * the token's index row is streamed into SMEM with a blocked SMEM BlockSpec (never a scalar prefetch of
    the whole [T, K] tensor, which overflows SMEM), and the same row also arrives in VMEM as a vector, from
    which the validity mask of each chunk is read;
  * the latent rows stay in HBM (`pl.ANY`) and are gathered one row per DMA into a double-buffered VMEM
    slot of `block_k` rows: chunk c+1 is in flight while chunk c is computed; one semaphore wait per
    slot, on a descriptor of the whole slot (a DMA semaphore counts bytes);
  * online softmax over the chunks; accumulators live in VMEM scratch; the loop stops after the query's
    last valid chunk (`n_chunks`);
  * backward: the same gather and recompute of P from the saved lse; dQ accumulates in the program; the
    per-slot dK/dV rows G are written to HBM with double-buffered DMAs and scatter-added by XLA (TensorCore
    DMAs cannot add), token chunk by token chunk so the staging stays bounded.

`interpret` may be True (HLO interpreter) or a `pltpu.InterpretParams` (TPU-faithful simulator with race
detection; about 1 ms per row DMA, so tiny shapes only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_mla_common import NEG, cdiv, cost_estimate, dot_nn, dot_nt, dot_tn, finish_lse, \
    pad_axis, prepare_indices, round_up

F32 = jnp.float32
_STAGING_BUDGET_BYTES = 1 << 28  # G rows (f32) staged in HBM per token chunk of the backward


def default_block_k(k: int) -> int:
    """128 slots per chunk (lane-aligned validity slices), fewer when the whole list is shorter."""
    return 128 if k >= 128 else round_up(k, 8)


class _Gather:
    """Double-buffered row gather of a query's chunks from HBM into VMEM slots."""

    def __init__(self, idx_smem, kvn_hbm, kr_hbm, buf_n, buf_r, sem_n, sem_r, block_k):
        self.idx, self.kvn, self.kr = idx_smem, kvn_hbm, kr_hbm
        self.buf_n, self.buf_r, self.sem_n, self.sem_r = buf_n, buf_r, sem_n, sem_r
        self.bk = block_k
        self.b = pl.program_id(0)
        self.s_len = kvn_hbm.shape[1]

    def start(self, c, slot):
        base = c * self.bk

        @pl.loop(0, self.bk)
        def _(j):
            r = self.idx[0, base + j]
            # unused slots fetch a spread-out real row (masked later) instead of hammering row 0
            r = jnp.where(r >= 0, r, lax.rem(base + j, self.s_len))
            pltpu.make_async_copy(self.kvn.at[self.b, pl.ds(r, 1)], self.buf_n.at[slot, pl.ds(j, 1)],
                                  self.sem_n.at[slot]).start()
            pltpu.make_async_copy(self.kr.at[self.b, pl.ds(r, 1)], self.buf_r.at[slot, pl.ds(j, 1)],
                                  self.sem_r.at[slot]).start()

    def wait(self, slot):
        # one wait per slot: the descriptor covers all bk rows, and the semaphore counts bytes
        pltpu.make_async_copy(self.buf_n.at[slot], self.buf_n.at[slot], self.sem_n.at[slot]).wait()
        pltpu.make_async_copy(self.buf_r.at[slot], self.buf_r.at[slot], self.sem_r.at[slot]).wait()

    def loop(self, n, chunk_fn):
        """Runs chunk_fn(c, slot, kn [bk, Dc], kr [bk, Dr]) for c < n with the next chunk in flight."""

        @pl.when(n > 0)
        def _():
            self.start(0, 0)

        @pl.loop(0, n)
        def _(c):
            slot = lax.rem(c, 2)

            @pl.when(c + 1 < n)
            def _():
                self.start(c + 1, 1 - slot)

            self.wait(slot)
            chunk_fn(c, slot, self.buf_n[slot], self.buf_r[slot])


def _scratch(dc, dr, bk, dtype):
    return [pltpu.VMEM((2, bk, dc), dtype), pltpu.VMEM((2, bk, dr), dtype),
            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,))]


def _index_specs(kp):
    """The token's index row in SMEM (DMA addresses) and in VMEM (validity vector), and its chunk count."""
    # [B, T, 1, .] arrays: Mosaic wants the last two block dims (8, 128)-aligned or whole, in SMEM too
    return [pl.BlockSpec((None, None, 1, kp), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, 1, kp), lambda b, t: (b, t, 0, 0)),
            pl.BlockSpec((None, None, 1, 1), lambda b, t: (b, t, 0, 0), memory_space=pltpu.SMEM)]


def _token_spec(*dims):
    return pl.BlockSpec((None, None) + dims, lambda b, t: (b, t) + (0,) * len(dims))


_HBM = pl.BlockSpec(memory_space=pl.ANY)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(qn_ref, qr_ref, idx_s, idx_v, nck, kvn_hbm, kr_hbm, o_ref, lse_ref, buf_n, buf_r, sem_n, sem_r,
                acc_ref, m_ref, l_ref, *, scale, block_k):
    qn, qr = qn_ref[...], qr_ref[...]
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
    m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)

    def chunk(c, slot, kn, kr):
        valid = idx_v[:, pl.ds(pl.multiple_of(c * block_k, block_k), block_k)] >= 0  # [1, bk]
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * scale
        s = jnp.where(valid, s, -jnp.inf)  # m stays finite, so exp(-inf - m) = 0
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + dot_nn(p.astype(kn.dtype), kn)
        m_ref[...] = m_new

    _Gather(idx_s, kvn_hbm, kr_hbm, buf_n, buf_r, sem_n, sem_r, block_k).loop(nck[0, 0], chunk)
    l = l_ref[...]
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m_ref[...] + jnp.log(l_safe), -jnp.inf)


def forward(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, interpret=False,
            block_k: int | None = None):
    """Sparse MLA forward on TPU -> (out [B, T, H, Dc] in q_nope's dtype, lse f32 [B, T, H], +inf if empty).

    Shapes and semantics as `pallas_kernels.sparse_mla`.
    """
    b, t, h, dc = q_nope.shape
    s_len, dr = kv_nope.shape[1], q_rope.shape[-1]
    bk = block_k or default_block_k(indices.shape[-1])
    idx, n_chunks = prepare_indices(indices, s_len, bk)
    kp = idx.shape[-1]
    kernel = functools.partial(_fwd_kernel, scale=float(scale), block_k=bk)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, t),
        in_specs=[_token_spec(h, dc), _token_spec(h, dr), *_index_specs(kp), _HBM, _HBM],
        out_specs=[_token_spec(h, dc), _token_spec(h, 1)],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, dc), q_nope.dtype), jax.ShapeDtypeStruct((b, t, h, 1), F32)],
        scratch_shapes=_scratch(dc, dr, bk, kv_nope.dtype)
        + [pltpu.VMEM((h, dc), F32), pltpu.VMEM((h, 1), F32), pltpu.VMEM((h, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=cost_estimate(b, t, h, kp, dc, dr, kv_nope.dtype.itemsize),
        interpret=interpret,
        name="sparse_mla_fwd_tpu",
    )(q_nope, q_rope, idx[:, :, None, :], idx[:, :, None, :], n_chunks[..., None, None], kv_nope, k_rope)
    return o, finish_lse(lse[..., 0])


# ----------------------------------------------------------------------------- backward
def _bwd_kernel(qn_ref, qr_ref, idx_s, idx_v, nck, kvn_hbm, kr_hbm, do_ref, lse_ref, delta_ref,
                dqn_ref, dqr_ref, gn_hbm, gr_hbm, buf_n, buf_r, sem_n, sem_r, gn_buf, gr_buf, sem_gn, sem_gr,
                dqn_acc, dqr_acc, *, scale, block_k):
    b, t = pl.program_id(0), pl.program_id(1)
    qn, qr, do = qn_ref[...], qr_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [H, 1]; lse = +inf for an empty query, so P = 0
    dqn_acc[...] = jnp.zeros(dqn_acc.shape, F32)
    dqr_acc[...] = jnp.zeros(dqr_acc.shape, F32)

    def write(c, slot):
        dst = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
        return (pltpu.make_async_copy(gn_buf.at[slot], gn_hbm.at[b, t, dst], sem_gn.at[slot]),
                pltpu.make_async_copy(gr_buf.at[slot], gr_hbm.at[b, t, dst], sem_gr.at[slot]))

    def chunk(c, slot, kn, kr):
        valid = idx_v[:, pl.ds(pl.multiple_of(c * block_k, block_k), block_k)] >= 0
        s = (dot_nt(qn, kn) + dot_nt(qr, kr)) * scale
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)  # [H, bk]
        ds = p * (dot_nt(do, kn) - delta)
        ds_c = ds.astype(kn.dtype)
        dqn_acc[...] += dot_nn(ds_c, kn)
        dqr_acc[...] += dot_nn(ds_c, kr)

        @pl.when(c >= 2)  # the slot's previous write (chunk c - 2) must have left the buffer
        def _():
            for cp in write(c - 2, slot):
                cp.wait()

        gn_buf[slot] = dot_tn(ds_c, qn) * scale + dot_tn(p.astype(do.dtype), do)
        gr_buf[slot] = dot_tn(ds_c, qr) * scale
        for cp in write(c, slot):
            cp.start()

    n = nck[0, 0]
    _Gather(idx_s, kvn_hbm, kr_hbm, buf_n, buf_r, sem_n, sem_r, block_k).loop(n, chunk)
    for back in (2, 1):  # drain the last (up to) two writes
        @pl.when(n >= back)
        def _():
            for cp in write(n - back, lax.rem(n - back, 2)):
                cp.wait()

    dqn_ref[...] = (dqn_acc[...] * scale).astype(dqn_ref.dtype)
    dqr_ref[...] = (dqr_acc[...] * scale).astype(dqr_ref.dtype)


def _bwd_call(qn, qr, idx, n_chunks, kvn, kr, do, lse, delta, *, scale, block_k, interpret):
    """One token chunk: (dq_nope, dq_rope, G_nope f32 [B, Tc, Kp, Dc], G_rope f32 [B, Tc, Kp, Dr])."""
    b, tc, h, dc = qn.shape
    dr, kp = qr.shape[-1], idx.shape[-1]
    kernel = functools.partial(_bwd_kernel, scale=scale, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(b, tc),
        in_specs=[_token_spec(h, dc), _token_spec(h, dr), *_index_specs(kp), _HBM, _HBM,
                  _token_spec(h, dc), _token_spec(h, 1), _token_spec(h, 1)],
        out_specs=[_token_spec(h, dc), _token_spec(h, dr), _HBM, _HBM],
        out_shape=[jax.ShapeDtypeStruct(qn.shape, qn.dtype), jax.ShapeDtypeStruct(qr.shape, qr.dtype),
                   jax.ShapeDtypeStruct((b, tc, kp, dc), F32), jax.ShapeDtypeStruct((b, tc, kp, dr), F32)],
        scratch_shapes=_scratch(dc, dr, block_k, kvn.dtype)
        + [pltpu.VMEM((2, block_k, dc), F32), pltpu.VMEM((2, block_k, dr), F32),
           pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,)),
           pltpu.VMEM((h, dc), F32), pltpu.VMEM((h, dr), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=cost_estimate(b, tc, h, kp, dc, dr, kvn.dtype.itemsize, backward=True),
        interpret=interpret,
        name="sparse_mla_bwd_tpu",
    )(qn, qr, idx[:, :, None, :], idx[:, :, None, :], n_chunks[..., None, None], kvn, kr, do, lse[..., None],
      delta[..., None])


def backward(q_nope, q_rope, kv_nope, k_rope, indices, out, lse, dout, dlse, *, scale: float, interpret=False,
             block_k: int | None = None, token_chunk: int | None = None):
    """Gradients of `forward` -> (dq_nope, dq_rope, dkv_nope, dk_rope), each in its input's dtype.

    out/lse: the forward's results; dout [B, T, H, Dc], dlse f32 [B, T, H]: their cotangents.
    The kernel runs over chunks of `token_chunk` queries; each chunk's staged G rows are scatter-added
    into fp32 dK/dV by XLA before the next chunk runs.
    """
    b, t, h, dc = q_nope.shape
    s_len, dr = kv_nope.shape[1], q_rope.shape[-1]
    bk = block_k or default_block_k(indices.shape[-1])
    idx, n_chunks = prepare_indices(indices, s_len, bk)
    kp = idx.shape[-1]
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)  # [B, T, H]
    tc = token_chunk or max(1, min(t, _STAGING_BUDGET_BYTES // (b * kp * (dc + dr) * 4)))
    n_tc = cdiv(t, tc)
    tp = n_tc * tc
    pad = lambda x, v=0: pad_axis(x, 1, tp, v)
    chunks = lambda x: jnp.moveaxis(x.reshape((b, n_tc, tc) + x.shape[2:]), 1, 0)
    xs = tuple(chunks(pad(a, v)) for a, v in ((q_nope, 0), (q_rope, 0), (idx, -1), (n_chunks, 0), (dout, 0),
                                              (lse.astype(F32), jnp.inf), (delta, 0)))

    def step(acc, x):
        qn, qr, ix, nc, do, ls, dl = x
        dqn, dqr, gn, gr = _bwd_call(qn, qr, ix, nc, kv_nope, k_rope, do, ls, dl, scale=float(scale),
                                     block_k=bk, interpret=interpret)
        # unwritten G rows (chunks past n_chunks) belong to unused slots: dropped via index S
        rows = jnp.where(ix >= 0, ix, s_len).reshape(b, -1)
        add = jax.vmap(lambda a, r, g: a.at[r].add(g.reshape(-1, g.shape[-1]), mode="drop"))
        return (add(acc[0], rows, gn), add(acc[1], rows, gr)), (dqn, dqr)

    acc0 = (jnp.zeros((b, s_len, dc), F32), jnp.zeros((b, s_len, dr), F32))
    (dkvn, dkr), (dqn, dqr) = lax.scan(step, acc0, xs)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, tp) + x.shape[3:])[:, :t]
    return unchunk(dqn), unchunk(dqr), dkvn.astype(kv_nope.dtype), dkr.astype(k_rope.dtype)
