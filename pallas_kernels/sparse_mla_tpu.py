"""Sparse MLA (DSA) kernels for the TPU TensorCore (Pallas Mosaic): forward, backward and decode.

Layout (what the real Mosaic compiler accepts in bf16 on v5e/v5p/v6e; tests/test_tpu_compile.py):
  * the latent cache is the kernel-native packed row (`latent_pack`): uint32 [L, B, S, W], nope and rope
    fused, W = (Dc + Dr) / 2. One DMA gathers one selected row (a one-row DMA into a packed bf16 VMEM
    buffer is not a legal unit). The kernels take the whole stacked cache and a scalar-prefetched layer
    index, so a decode step's layer scan never materialises one layer's cache;
  * grid (B, T/8, 8): one step = one query token x all H heads (M = H fills the MXU). The lse leaves as
    lane-dense f32 [B, T, H] rows, 8 tokens per output block (the innermost grid axis is sequential);
  * the token's index row arrives in SMEM as a flat 1-D block (no singleton dims, passed once). Valid
    slots are a prefix of the row (`prepare_indices` compacts them; the indexer's top-k already emits
    them so), and the kernel finds its length by a binary search over SMEM, so the validity mask of each
    chunk is an iota compare and no second copy of the indices is needed;
  * rows are gathered one DMA per slot into a double-buffered VMEM slot of `block_k` rows: chunk c+1 is in
    flight while chunk c is computed; one semaphore wait per slot (a DMA semaphore counts bytes);
  * the bf16 halves are unpacked in VMEM (shift/mask + bitcast, exact), the rope query arrives pre-split
    into the columns paired in the low and high halves, so nothing is relaid out per call;
  * online softmax over the chunks; the loop stops after the query's last valid chunk;
  * backward: the same gather and a recompute of P from the saved lse; dQ accumulates in the program; the
    per-slot dK/dV rows G (f32, natural column order: nope [bk, Dc], rope [bk, 128] zero-padded) are written
    to HBM with double-buffered DMAs and scatter-added by XLA (TensorCore DMAs cannot add), token chunk by
    token chunk.

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

from pallas_kernels import latent_pack
from pallas_kernels.sparse_mla_common import NEG, cdiv, cost_estimate, dot_nn, dot_nt, dot_tn, finish_lse, \
    pad_axis, round_up

F32, BF16 = jnp.float32, jnp.bfloat16
TOKENS_PER_BLOCK = 8  # tokens per lse output block: the f32 sublane tile
_STAGING_BUDGET_BYTES = 1 << 26  # G rows (f32) staged in HBM per token chunk of the backward (64 MiB)


def default_block_k(k: int) -> int:
    """128 slots per chunk (the lane width of the score tile), fewer when the whole list is shorter."""
    return 128 if k >= 128 else round_up(k, 8)


def supports(dc: int, dr: int) -> bool:
    """Whether the kernel takes these widths (see `check_dims`)."""
    return dc % 256 == 0 and dr % 2 == 0


def check_dims(dc: int, dr: int) -> None:
    """The packed row is unpacked with lane-aligned slices: Dc/2 must be a multiple of 128."""
    if not supports(dc, dr):
        raise ValueError(f"the TPU sparse MLA kernel needs Dc % 256 == 0 and an even Dr (got Dc={dc}, "
                         f"Dr={dr}); use backend='xla' for other widths.")


# ----------------------------------------------------------------------------- inputs
def prepare_indices(indices: jax.Array, s_len: int, block_k: int, *, prefix_valid: bool) -> jax.Array:
    """int [B, T, K] (< 0 unused) -> int32 [B, T, Kp]: entries in [0, S) first, then -1 (Kp = K rounded up
    to block_k). prefix_valid: the caller guarantees valid slots already come first (skips the sort)."""
    idx = indices.astype(jnp.int32)
    valid = (idx >= 0) & (idx < s_len)
    idx = jnp.where(valid, idx, -1)
    if not prefix_valid:  # stable: the valid slots keep their order
        order = jnp.argsort(~valid, axis=-1, stable=True)
        idx = jnp.take_along_axis(idx, order, axis=-1)
    return pad_axis(idx, 2, round_up(idx.shape[-1], block_k), -1)


def fold_batch_for_decode(q_nope, q_rope, idx, b: int, s_len: int):
    """Decode (T = 1): the batch becomes the token axis of one sequence over a [B·S] cache (a free reshape),
    with global row indices, so 8 sequences share a grid block instead of 8 padded tokens."""
    fold = lambda x: x.reshape((1, b) + x.shape[2:])
    offs = (jnp.arange(b, dtype=jnp.int32) * s_len)[:, None, None]
    return fold(q_nope), fold(q_rope), fold(jnp.where(idx >= 0, idx + offs, -1))


def _pad_tokens(x, tp, value=0):
    return pad_axis(x, 1, tp, value)


# ----------------------------------------------------------------------------- in-kernel pieces
def _n_valid(idx_s, kp: int):
    """Number of leading valid (>= 0) entries of the SMEM index row (valid slots are a prefix)."""
    def body(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) // 2
        ok = idx_s[jnp.minimum(mid, kp - 1)] >= 0
        go_right = (lo < hi) & ok
        return jnp.where(go_right, mid + 1, lo), jnp.where((lo < hi) & ~ok, mid, hi)

    return lax.fori_loop(0, kp.bit_length(), body, (jnp.int32(0), jnp.int32(kp)))[0]


class _Gather:
    """Double-buffered one-DMA-per-row gather of a query's chunks from the packed HBM cache into VMEM."""

    def __init__(self, idx_s, cache_hbm, layer, batch, buf, sem, block_k):
        self.idx, self.cache, self.buf, self.sem, self.bk = idx_s, cache_hbm, buf, sem, block_k
        self.layer, self.batch = layer, batch
        self.s_len = cache_hbm.shape[2]

    def start(self, c, slot):
        base = c * self.bk

        @pl.loop(0, self.bk)
        def _(j):
            r = self.idx[base + j]
            # unused slots of the last chunk fetch a spread-out real row (masked later): the slot's single
            # wait counts the bytes of all bk rows
            r = jnp.where(r >= 0, r, lax.rem(base + j, self.s_len))
            pltpu.make_async_copy(self.cache.at[self.layer, self.batch, pl.ds(r, 1)],
                                  self.buf.at[slot, pl.ds(j, 1)], self.sem.at[slot]).start()

    def wait(self, slot):
        pltpu.make_async_copy(self.buf.at[slot], self.buf.at[slot], self.sem.at[slot]).wait()

    def loop(self, n, chunk_fn):
        """Runs chunk_fn(c, rows u32 [bk, W]) for c < n with the next chunk in flight."""

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
            chunk_fn(c, slot, self.buf[slot])


def _unpack_rows(rows, dc: int, dr: int):
    """u32 [bk, row_words] -> (kn bf16 [bk, Dc], kr_lo bf16 [bk, Dr/2], kr_hi bf16 [bk, Dr/2])."""
    lo, hi = latent_pack.halves(rows)
    h, w = dc // 2, latent_pack.packed_width(dc, dr)
    kn = jnp.concatenate([lo[:, :h], hi[:, :h]], axis=1).astype(BF16)
    return kn, lo[:, h:w].astype(BF16), hi[:, h:w].astype(BF16)


def _scores(qn, qrl, qrh, kn, krl, krh, scale):
    return (dot_nt(qn, kn) + dot_nt(qrl, krl) + dot_nt(qrh, krh)) * scale  # [H, bk] f32


def _row(col):
    """[H, 1] -> [1, H] (a lane-dense lse row)."""
    return jnp.transpose(col)


def _col(row):
    """[1, H] -> [H, 1]."""
    return jnp.transpose(row)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(layer_ref, idx_s, qn_ref, qrl_ref, qrh_ref, cache_hbm, o_ref, lse_ref, buf, sem, acc_ref, m_ref,
                l_ref, *, scale, block_k, dc, kp):
    b, j = pl.program_id(0), pl.program_id(2)
    qn, qrl, qrh = qn_ref[...], qrl_ref[...], qrh_ref[...]
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
    m_ref[...] = jnp.full(m_ref.shape, NEG, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)
    idx_s = idx_s.at[j]  # this token's row
    n_valid = _n_valid(idx_s, kp)

    def chunk(c, slot, rows):
        kn, krl, krh = _unpack_rows(rows, dc, 2 * qrl.shape[-1])
        valid = lax.broadcasted_iota(jnp.int32, (1, block_k), 1) + c * block_k < n_valid
        s = jnp.where(valid, _scores(qn, qrl, qrh, kn, krl, krh, scale), -jnp.inf)  # m stays finite
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + dot_nn(p.astype(BF16), kn)
        m_ref[...] = m_new

    _Gather(idx_s, cache_hbm, layer_ref[0], b, buf, sem, block_k).loop(cdiv_traced(n_valid, block_k), chunk)
    l = l_ref[...]
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
    lse_ref[pl.ds(j, 1), :] = _row(jnp.where(nonempty, m_ref[...] + jnp.log(l_safe), -jnp.inf))


def cdiv_traced(a, b: int):
    return (a + (b - 1)) // b


def _token_spec(h, d):
    return pl.BlockSpec((None, None, h, d), lambda b, i, j, lay: (b, i * TOKENS_PER_BLOCK + j, 0, 0))


def _index_spec(kp):
    """8 tokens' index rows per SMEM block ([8, Kp] int32, 64 KiB at Kp = 2048); step j reads row j."""
    return pl.BlockSpec((None, TOKENS_PER_BLOCK, kp), lambda b, i, j, lay: (b, i, 0), memory_space=pltpu.SMEM)


def _rows_spec(h):
    return pl.BlockSpec((None, TOKENS_PER_BLOCK, h), lambda b, i, j, lay: (b, i, 0))


_HBM = pl.BlockSpec(memory_space=pl.ANY)
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward_packed(q_nope, q_rope, cache, layer, indices, *, scale: float, interpret=False,
                   block_k: int | None = None, prefix_valid: bool = False):
    """Sparse MLA over a packed latent cache -> (out [B, T, H, Dc] bf16, lse f32 [B, T, H], +inf if empty).

    q_nope [B, T, H, Dc], q_rope [B, T, H, Dr] (cast to bf16); cache uint32 [L, B, S, W] (`latent_pack`);
    layer: int32 scalar, the layer of the stacked cache to read; indices int [B, T, K] into [0, S) (others
    are unused slots). prefix_valid: valid slots come first in every row (the indexer's output), which
    skips a sort.
    """
    b, t, h, dc = q_nope.shape
    n_layers, _, s_len, stored = cache.shape
    dr = q_rope.shape[-1]
    check_dims(dc, dr)
    if latent_pack.row_words(dc, dr) != stored or cache.dtype != jnp.uint32:
        raise ValueError(f"the packed cache must be uint32 [L, B, S, {latent_pack.row_words(dc, dr)}] "
                         f"(latent_pack.pack), got {cache.dtype} {cache.shape}.")
    bk = block_k or default_block_k(indices.shape[-1])
    idx = prepare_indices(indices, s_len, bk, prefix_valid=prefix_valid)
    fold = t == 1 and b > 1
    if fold:
        q_nope, q_rope, idx = fold_batch_for_decode(q_nope, q_rope, idx, b, s_len)
        cache = cache.reshape(n_layers, 1, b * s_len, stored)
    bb, tt = q_nope.shape[:2]
    tp = round_up(tt, TOKENS_PER_BLOCK)
    kp = idx.shape[-1]
    qn = _pad_tokens(q_nope.astype(BF16), tp)
    qrl, qrh = (_pad_tokens(x.astype(BF16), tp) for x in latent_pack.split_rope(q_rope))
    idx = _pad_tokens(idx, tp, -1)
    kernel = functools.partial(_fwd_kernel, scale=float(scale), block_k=bk, dc=dc, kp=kp)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(bb, tp // TOKENS_PER_BLOCK, TOKENS_PER_BLOCK),
            in_specs=[_index_spec(kp), _token_spec(h, dc), _token_spec(h, dr // 2), _token_spec(h, dr // 2),
                      _HBM],
            out_specs=[_token_spec(h, dc), _rows_spec(h)],
            scratch_shapes=[pltpu.VMEM((2, bk, stored), jnp.uint32), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((h, dc), F32), pltpu.VMEM((h, 1), F32), pltpu.VMEM((h, 1), F32)]),
        out_shape=[jax.ShapeDtypeStruct((bb, tp, h, dc), BF16), jax.ShapeDtypeStruct((bb, tp, h), F32)],
        compiler_params=_SEMANTICS,
        cost_estimate=cost_estimate(bb, tp, h, kp, dc, dr, 2),
        interpret=interpret,
        name="sparse_mla_fwd_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), idx, qn, qrl, qrh, cache)
    o, lse = o[:, :tt], finish_lse(lse[:, :tt])
    if fold:
        o, lse = o.reshape((b, 1) + o.shape[2:]), lse.reshape(b, 1, h)
    return o, lse


def forward(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, interpret=False,
            block_k: int | None = None, prefix_valid: bool = False):
    """Sparse MLA forward on TPU from unpacked latents (packed here) -> (out [B, T, H, Dc] in q_nope's
    dtype, lse f32 [B, T, H]). Shapes and semantics as `pallas_kernels.sparse_mla`."""
    cache = latent_pack.pack(kv_nope, k_rope)[None]
    o, lse = forward_packed(q_nope, q_rope, cache, 0, indices, scale=scale, interpret=interpret,
                            block_k=block_k, prefix_valid=prefix_valid)
    return o.astype(q_nope.dtype), lse


# ----------------------------------------------------------------------------- backward
def _bwd_kernel(layer_ref, idx_s, qn_ref, qrl_ref, qrh_ref, qr_ref, do_ref, lse_ref, delta_ref, cache_hbm,
                dqn_ref, dqrl_ref, dqrh_ref, gn_hbm, gr_hbm, buf, sem, gn_buf, gr_buf, sem_g, dqn_acc,
                dqrl_acc, dqrh_acc, *, scale, block_k, dc, kp):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tok = i * TOKENS_PER_BLOCK + j
    qn, qrl, qrh, qr, do = qn_ref[...], qrl_ref[...], qrh_ref[...], qr_ref[...], do_ref[...]
    lse = _col(lse_ref[pl.ds(j, 1), :])  # [H, 1]; +inf for an empty query, so P = 0
    delta = _col(delta_ref[pl.ds(j, 1), :])
    for acc in (dqn_acc, dqrl_acc, dqrh_acc):
        acc[...] = jnp.zeros(acc.shape, F32)
    idx_s = idx_s.at[j]  # this token's row
    n_valid = _n_valid(idx_s, kp)

    def write(c, slot):
        dst = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
        return (pltpu.make_async_copy(gn_buf.at[slot], gn_hbm.at[b, tok, dst], sem_g.at[0, slot]),
                pltpu.make_async_copy(gr_buf.at[slot], gr_hbm.at[b, tok, dst], sem_g.at[1, slot]))

    def chunk(c, slot, rows):
        kn, krl, krh = _unpack_rows(rows, dc, 2 * qrl.shape[-1])
        valid = lax.broadcasted_iota(jnp.int32, (1, block_k), 1) + c * block_k < n_valid
        s = _scores(qn, qrl, qrh, kn, krl, krh, scale)
        p = jnp.where(valid, jnp.exp(s - lse), 0.0)  # [H, bk]
        ds = (p * (dot_nt(do, kn) - delta)).astype(BF16)
        dqn_acc[...] += dot_nn(ds, kn)
        dqrl_acc[...] += dot_nn(ds, krl)
        dqrh_acc[...] += dot_nn(ds, krh)

        @pl.when(c >= 2)  # the slot's previous write (chunk c - 2) must have left the buffer
        def _():
            for cp in write(c - 2, slot):
                cp.wait()

        # dK/dV rows in natural column order: nope [bk, Dc], rope against the zero-padded [H, 128] query
        gn_buf[slot] = dot_tn(ds, qn) * scale + dot_tn(p.astype(BF16), do)
        gr_buf[slot] = dot_tn(ds, qr) * scale
        for cp in write(c, slot):
            cp.start()

    n = cdiv_traced(n_valid, block_k)
    _Gather(idx_s, cache_hbm, layer_ref[0], b, buf, sem, block_k).loop(n, chunk)
    for back in (2, 1):  # drain the last (up to) two writes
        @pl.when(n >= back)
        def _():
            for cp in write(n - back, lax.rem(n - back, 2)):
                cp.wait()

    dqn_ref[...] = (dqn_acc[...] * scale).astype(dqn_ref.dtype)
    dqrl_ref[...] = (dqrl_acc[...] * scale).astype(dqrl_ref.dtype)
    dqrh_ref[...] = (dqrh_acc[...] * scale).astype(dqrh_ref.dtype)


def _bwd_call(qn, qrl, qrh, qr, idx, cache, do, lse, delta, *, scale, block_k, dc, interpret):
    """One token chunk (tc a multiple of 8) -> (dq_nope, dq_rope lo/hi, G nope f32 [B, tc, Kp, Dc],
    G rope f32 [B, tc, Kp, Drp])."""
    b, tc, h, _ = qn.shape
    dr2, kp, drp = qrl.shape[-1], idx.shape[-1], qr.shape[-1]
    kernel = functools.partial(_bwd_kernel, scale=scale, block_k=block_k, dc=dc, kp=kp)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, tc // TOKENS_PER_BLOCK, TOKENS_PER_BLOCK),
            in_specs=[_index_spec(kp), _token_spec(h, dc), _token_spec(h, dr2), _token_spec(h, dr2),
                      _token_spec(h, drp), _token_spec(h, dc), _rows_spec(h), _rows_spec(h), _HBM],
            out_specs=[_token_spec(h, dc), _token_spec(h, dr2), _token_spec(h, dr2), _HBM, _HBM],
            scratch_shapes=[pltpu.VMEM((2, block_k, cache.shape[-1]), jnp.uint32), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((2, block_k, dc), F32), pltpu.VMEM((2, block_k, drp), F32),
                            pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((h, dc), F32), pltpu.VMEM((h, dr2), F32), pltpu.VMEM((h, dr2), F32)]),
        out_shape=[jax.ShapeDtypeStruct((b, tc, h, dc), BF16), jax.ShapeDtypeStruct((b, tc, h, dr2), BF16),
                   jax.ShapeDtypeStruct((b, tc, h, dr2), BF16), jax.ShapeDtypeStruct((b, tc, kp, dc), F32),
                   jax.ShapeDtypeStruct((b, tc, kp, drp), F32)],
        compiler_params=_SEMANTICS,
        cost_estimate=cost_estimate(b, tc, h, kp, dc, 2 * dr2, 2, backward=True),
        interpret=interpret,
        name="sparse_mla_bwd_tpu",
    )(jnp.zeros((1,), jnp.int32), idx, qn, qrl, qrh, qr, do, lse, delta, cache)


def backward(q_nope, q_rope, kv_nope, k_rope, indices, out, lse, dout, dlse, *, scale: float, interpret=False,
             block_k: int | None = None, token_chunk: int | None = None, prefix_valid: bool = False):
    """Gradients of `forward` -> (dq_nope, dq_rope, dkv_nope, dk_rope), each in its input's dtype.

    out/lse: the forward's results; dout [B, T, H, Dc], dlse f32 [B, T, H]: their cotangents.
    The kernel runs over chunks of `token_chunk` queries (rounded up to a multiple of 8); each chunk's staged
    G rows are scatter-added into f32 dK/dV by XLA before the next chunk runs.
    """
    b, t, h, dc = q_nope.shape
    s_len, dr = kv_nope.shape[1], q_rope.shape[-1]
    check_dims(dc, dr)
    bk = block_k or default_block_k(indices.shape[-1])
    idx = prepare_indices(indices, s_len, bk, prefix_valid=prefix_valid)
    kp, drp = idx.shape[-1], round_up(dr, 128)
    cache = latent_pack.pack(kv_nope, k_rope)[None]
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)  # [B, T, H]
    tb = TOKENS_PER_BLOCK
    tc = token_chunk or max(1, _STAGING_BUDGET_BYTES // (b * kp * (dc + drp) * 4))
    tc = min(round_up(tc, tb), round_up(t, tb))
    n_tc = cdiv(t, tc)
    tp = n_tc * tc
    chunks = lambda x: jnp.moveaxis(x.reshape((b, n_tc, tc) + x.shape[2:]), 1, 0)
    qr = q_rope.astype(BF16)
    qrl, qrh = latent_pack.split_rope(qr)
    xs = tuple(chunks(_pad_tokens(a, tp, v)) for a, v in (
        (q_nope.astype(BF16), 0), (qrl, 0), (qrh, 0), (pad_axis(qr, 3, drp), 0), (idx, -1),
        (dout.astype(BF16), 0), (lse.astype(F32), jnp.inf), (delta, 0)))

    def step(acc, x):
        qn, ql, qh, qp, ix, do, ls, dl = x
        dqn, dql, dqh, gn, gr = _bwd_call(qn, ql, qh, qp, ix, cache, do, ls, dl, scale=float(scale), block_k=bk,
                                          dc=dc, interpret=interpret)
        # G rows past a query's valid slots are unwritten garbage: dropped via row index S
        rows = jnp.where(ix >= 0, ix, s_len).reshape(b, -1)
        add = jax.vmap(lambda a, r, g: a.at[r].add(g.reshape(-1, g.shape[-1]), mode="drop"))
        return (add(acc[0], rows, gn), add(acc[1], rows, gr)), (dqn, dql, dqh)

    acc0 = (jnp.zeros((b, s_len, dc), F32), jnp.zeros((b, s_len, drp), F32))
    (dkvn, dkr), (dqn, dql, dqh) = lax.scan(step, acc0, xs)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, tp) + x.shape[3:])[:, :t]
    dqr = jnp.concatenate([unchunk(dql), unchunk(dqh)], axis=-1)
    return (unchunk(dqn).astype(q_nope.dtype), dqr.astype(q_rope.dtype), dkvn.astype(kv_nope.dtype),
            dkr[..., :dr].astype(k_rope.dtype))
