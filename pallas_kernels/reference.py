"""Pure-JAX (XLA) implementations of the DSA ops: the CPU path and the oracle for every kernel.

Memory stays O(T_chunk · K) (sparse) or O(T_chunk · S) (dense, indexer): every op scans over query
chunks, and the sparse attention has a custom VJP that recomputes the gathered rows from the saved
log-sum-exp instead of keeping `[T, K, 576]` gathers alive for the backward pass.

Conventions shared with the kernels:
  * `indices` entries < 0 are unused slots; a query with no valid slot returns zeros and lse = +inf.
  * key `k` is visible to query `q` iff k_pos <= q_pos, k_pos >= 0 and (with segment ids) the segments
    match. Padding keys carry position -1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
_CHUNK_BUDGET_BYTES = 1 << 27  # per-chunk f32 working set of the XLA scans (128 MiB)
# The sparse gather on CPU is memory-bound: a working set that stays in cache (a few query rows) ran ~2x
# faster than 128 MiB chunks at L=4096, K=2048, H=16 (experiments/bench_sparse_mla.py).
_CPU_SPARSE_BUDGET_BYTES = 1 << 23
# Key widths the XLA indexer top-k picks from per query chunk (`indexer_topk`): multiples of S / 8, so a
# causal chunk scores at most S / 8 keys it cannot see.
_WIDTH_BUCKETS = 8
_PREFILTER_PASSES = 4  # bisection passes of `_below_kth_dropped`
# Below this many keys `indexer_topk` scores every key and calls `top_k` once: the widths and the bound
# save little there, and their nine `lax.switch` branches per call made every model compile ~1.6x slower
# (the tiny-config test suite is mostly compiles).
_WIDTH_MIN_KEYS = 512
# `sparse_mla_with_lse(method="auto")` attends densely with the top-k mask while S <= this many times K.
# One layer, H=32 over a 256+32 latent, K=256 (experiments/bench_forward.py, table 5): gathered vs masked
# dense 0.055 vs 0.055 s at S = 2K, 0.091 vs 0.109 s at 3K, 0.124 vs 0.187 s at 4K.
_GATHER_CROSSOVER = 2


# ----------------------------------------------------------------------------- helpers
def auto_chunk(t: int, bytes_per_row: int, cap: int, budget: int = _CHUNK_BUDGET_BYTES) -> int:
    """Largest power-of-two query chunk <= cap whose working set fits the budget (at least 1)."""
    c = max(1, min(cap, budget // max(1, bytes_per_row), t))
    return 1 << (c.bit_length() - 1)


def _pad_axis1(x: jax.Array, n: int, value=0) -> jax.Array:
    pad = n - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] (T a multiple of c) -> [T/c, B, c, ...] for lax.scan."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, t // c, c) + x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    """[n, B, c, ...] -> [B, n*c, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, S, D], idx [B, Tc, K] -> [B, Tc, K, D]."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _scatter_add_rows(acc: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    """acc [B, S, D] += rows [B, Tc, K, D] at idx [B, Tc, K]."""
    b = acc.shape[0]
    return jax.vmap(lambda a, i, r: a.at[i.reshape(-1)].add(r.reshape(-1, r.shape[-1])))(
        acc, idx.reshape(b, -1), rows.reshape(b, -1, rows.shape[-1]))


def visibility(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
               k_seg: jax.Array | None) -> jax.Array:
    """[B, Tq] x [B, S] -> bool [B, Tq, S]: causal, non-padding, same segment."""
    m = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
    if q_seg is not None:
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    return m


def _positions(x: jax.Array | None, b: int, n: int) -> jax.Array:
    if x is None:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    x = jnp.asarray(x, jnp.int32)
    return jnp.broadcast_to(x, (b, n)) if x.ndim == 1 else x


# ----------------------------------------------------------------------------- sparse MLA
def _sparse_fwd_chunk(qn, qr, kvn, kr, idx, scale):
    """One query chunk. qn [B,c,H,Dc], qr [B,c,H,Dr], idx [B,c,K] -> out f32 [B,c,H,Dc], lse [B,c,H].

    Scores are computed as [B, c, K, H] (the gathered rows on the left of each per-query matmul) and the
    probabilities used as [B, c, H, K]: XLA:CPU runs G · qᵀ and P · G as fast batched GEMMs, while
    q · Gᵀ is slower and Pᵀ · G falls back to a plain loop (2-3x slower).
    """
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    kn = _gather_rows(kvn, safe).astype(F32)
    kro = _gather_rows(kr, safe).astype(F32)
    s = (jnp.einsum("btkc,bthc->btkh", kn, qn.astype(F32))
         + jnp.einsum("btkr,bthr->btkh", kro, qr.astype(F32))) * scale
    s = jnp.where(valid[..., None], s, -jnp.inf)
    m = jnp.max(s, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.swapaxes(jnp.exp(s - m), 2, 3)  # [B, c, H, K]: the value product then runs as P · V, not Pᵀ · V
    l = jnp.sum(p, axis=3)  # [B, c, H]
    out = jnp.einsum("bthk,btkc->bthc", p, kn) / jnp.where(l > 0, l, 1.0)[..., None]
    m = m[:, :, 0]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return out, lse


def _sparse_bwd_chunk(qn, qr, kvn, kr, idx, out, lse, dout, dlse, scale):
    """Gradients of one chunk; returns dqn, dqr and the per-slot key/value gradients to scatter.

    With P = exp(S - lse): dS = P ⊙ (dO·Vᵀ - rowsum(dO ⊙ O) + dlse) (dlse: cotangent of the lse output).
    """
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    kn = _gather_rows(kvn, safe).astype(F32)
    kro = _gather_rows(kr, safe).astype(F32)
    qn, qr, dout = qn.astype(F32), qr.astype(F32), dout.astype(F32)
    s = (jnp.einsum("bthc,btkc->bthk", qn, kn) + jnp.einsum("bthr,btkr->bthk", qr, kro)) * scale
    p = jnp.where(valid[:, :, None, :], jnp.exp(s - lse[..., None]), 0.0)
    delta = jnp.sum(dout * out.astype(F32), axis=-1, keepdims=True)
    dp = jnp.einsum("bthc,btkc->bthk", dout, kn)
    ds = p * (dp - delta + dlse.astype(F32)[..., None])
    dqn = jnp.einsum("bthk,btkc->bthc", ds, kn) * scale
    dqr = jnp.einsum("bthk,btkr->bthr", ds, kro) * scale
    dkn = jnp.einsum("bthk,bthc->btkc", ds, qn) * scale + jnp.einsum("bthk,bthc->btkc", p, dout)
    dkr = jnp.einsum("bthk,bthr->btkr", ds, qr) * scale
    return dqn, dqr, safe, dkn, dkr


def _over_rows(t: int, c: int, fn, init):
    """Run `acc = fn(start, size, acc)` over the query-row blocks [start, start + size) of t rows: t // c
    blocks of c rows in one loop, then the t % c remainder (a static size) once.

    The blocks are sliced from [B, T, ...] operands in place (`_rows`) and written into [B, T, ...]
    outputs in place (`_put_rows`). A scan over stacked chunks [T/c, B, c, ...] would instead transpose
    every operand into that layout and the outputs back; on XLA:CPU those copies of [B, T, H, D] cost
    more than the attention itself (experiments/bench_forward.py, table 4)."""
    n = t // c
    acc = init
    if n:
        acc = jax.lax.fori_loop(0, n, lambda i, a: fn(i * c, c, a), acc)
    if t % c:
        acc = fn(n * c, t % c, acc)
    return acc


def _rows(x: jax.Array, start, size: int) -> jax.Array:
    """x [B, T, ...] -> rows [B, size, ...] from `start`."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put_rows(x: jax.Array, rows: jax.Array, start) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), start, axis=1)


def _sparse_scan_fwd(qn, qr, kvn, kr, idx, scale, chunk):
    """The forward over query-row blocks. The queries and the output cross the loop head-major
    ([B, H, T, D]), each block is transposed to token-major in cache: the absorbed queries come from a
    per-head matmul as [H, T, C] and the output goes into one, so XLA's own transposes of those
    [B, T, H, C] arrays cancel against these instead of copying them twice each."""
    b, t, h, dc = qn.shape
    qn_h, qr_h = jnp.swapaxes(qn, 1, 2), jnp.swapaxes(qr, 1, 2)

    def fn(start, size, acc):
        sl = lambda x: jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, start, size, axis=2), 1, 2)
        o, lse = _sparse_fwd_chunk(sl(qn_h), sl(qr_h), kvn, kr, _rows(idx, start, size), scale)
        put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, jnp.swapaxes(v, 1, 2).astype(x.dtype), start, 2)
        return put(acc[0], o), put(acc[1], lse)

    o, lse = _over_rows(t, chunk, fn, (jnp.zeros((b, h, t, dc), qn.dtype), jnp.zeros((b, h, t), F32)))
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(lse, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sparse_mla(qn, qr, kvn, kr, idx, scale, chunk):
    return _sparse_scan_fwd(qn, qr, kvn, kr, idx, scale, chunk)


def _sparse_mla_vjp_fwd(qn, qr, kvn, kr, idx, scale, chunk):
    o, lse = _sparse_scan_fwd(qn, qr, kvn, kr, idx, scale, chunk)
    return (o, lse), (qn, qr, kvn, kr, idx, o, lse)


def _sparse_mla_vjp_bwd(scale, chunk, res, cot):
    qn, qr, kvn, kr, idx, o, lse = res
    do, dlse = cot
    t = qn.shape[1]

    def fn(start, size, acc):
        dkvn, dkr, dqn, dqr = acc
        rows = [_rows(a, start, size) for a in (qn, qr, idx, o, lse, do, dlse)]
        dqn_c, dqr_c, safe, dkn_c, dkr_c = _sparse_bwd_chunk(*rows[:2], kvn, kr, *rows[2:], scale)
        return (_scatter_add_rows(dkvn, safe, dkn_c), _scatter_add_rows(dkr, safe, dkr_c),
                _put_rows(dqn, dqn_c, start), _put_rows(dqr, dqr_c, start))

    init = (jnp.zeros(kvn.shape, F32), jnp.zeros(kr.shape, F32), jnp.zeros_like(qn), jnp.zeros_like(qr))
    dkvn, dkr, dqn, dqr = _over_rows(t, chunk, fn, init)
    return dqn, dqr, dkvn.astype(kvn.dtype), dkr.astype(kr.dtype), None


_sparse_mla.defvjp(_sparse_mla_vjp_fwd, _sparse_mla_vjp_bwd)


def sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float,
                        chunk_size: int | None = None, method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Sparse MQA attention over gathered latent rows; returns (out [B,T,H,Dc], lse f32 [B,T,H]).

    out[b,t,h] = Σ_k softmax_k(scale·(q_nope·kv_nope[i_k] + q_rope·k_rope[i_k])) · kv_nope[i_k] over
    valid slots i_k = indices[b,t,k] >= 0. Differentiable in the four float inputs.

    method: "gather" (gather each query's K rows: O(T·K)), "dense" (every query against all S keys with
    its K-key mask built inside the chunk: O(T·S), but dense matmuls) or "auto": "dense" when
    S <= `_GATHER_CROSSOVER` · K, where dense matmuls over S keys cost less than the gathered ones over K
    on XLA:CPU (measured, `_GATHER_CROSSOVER`). Both give the same attention (the same keys, the same
    softmax), up to float summation order.
    """
    b, t, h, dc = q_nope.shape
    s_len, k = kv_nope.shape[1], indices.shape[-1]
    indices = indices.astype(jnp.int32)
    if method == "auto":
        method = "dense" if s_len <= _GATHER_CROSSOVER * k else "gather"
    if method == "dense":
        return _dense_scan(q_nope, q_rope, kv_nope, k_rope, float(scale),
                           chunk_size or _dense_chunk(b, t, h, s_len), [(indices, -1)],
                           lambda idx: _selected(idx, s_len))
    if method != "gather":
        raise ValueError(f"sparse_mla method {method!r}: use 'auto', 'gather' or 'dense'.")
    budget = _CPU_SPARSE_BUDGET_BYTES if jax.default_backend() == "cpu" else _CHUNK_BUDGET_BYTES
    c = chunk_size or auto_chunk(t, b * h * k * 4 * 3 + b * k * (dc + q_rope.shape[-1]) * 4, 256, budget)
    return _sparse_mla(q_nope, q_rope, kv_nope, k_rope, indices, float(scale), int(c))


def sparse_mla(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, chunk_size: int | None = None,
               method: str = "auto"):
    """`sparse_mla_with_lse` without the lse."""
    return sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, scale=scale, chunk_size=chunk_size,
                               method=method)[0]


# ----------------------------------------------------------------------------- dense (causal) MLA
def _dense_scan(q_nope, q_rope, kv_nope, k_rope, scale, chunk, rows, visible):
    """Attention of every query chunk over all S keys, restricted to `visible(*row_chunks)` -> bool
    [B, c, S], where `rows` are [B, T, ...] per-query inputs (padded with their fill value) cut into the
    same chunks. -> (out [B,T,H,Dc], lse f32 [B,T,H], +inf for a query that sees no key). The chunk body
    is rematerialised, so the backward never holds [T, H, S]."""
    t = q_nope.shape[1]
    c = chunk
    tp = -(-t // c) * c
    xs = tuple(_chunks(_pad_axis1(a, tp, v), c) for a, v in ((q_nope, 0), (q_rope, 0)) + tuple(rows))
    kvn, kr = kv_nope.astype(F32), k_rope.astype(F32)

    @jax.checkpoint
    def chunk_fn(qn, qr, *row_chunks):
        vis = visible(*row_chunks)
        sc = (jnp.einsum("bthc,bsc->bths", qn.astype(F32), kvn)
              + jnp.einsum("bthr,bsr->bths", qr.astype(F32), kr)) * scale
        sc = jnp.where(vis[:, :, None, :], sc, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(sc, axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(sc - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        nonempty = l[..., 0] > 0
        lse = jnp.where(nonempty, m[..., 0] + jnp.log(jnp.where(nonempty, l[..., 0], 1.0)), jnp.inf)
        return (jnp.einsum("bths,bsc->bthc", p, kvn) / jnp.where(l > 0, l, 1.0)).astype(q_nope.dtype), lse

    _, (out, lse) = jax.lax.scan(lambda _, x: (None, chunk_fn(*x)), None, xs)
    return _unchunk(out)[:, :t], _unchunk(lse)[:, :t]


def _dense_chunk(b: int, t: int, h: int, s_len: int) -> int:
    return auto_chunk(t, b * h * s_len * 4 * 3, 256)


def dense_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
                       q_segment_ids=None, k_segment_ids=None, chunk_size: int | None = None):
    """Causal MQA attention over all visible latent rows (DSA when every causal key is selected).

    q_nope [B,T,H,Dc], q_rope [B,T,H,Dr], kv_nope [B,S,Dc], k_rope [B,S,Dr] -> (out [B,T,H,Dc], lse f32
    [B,T,H], +inf for a query that sees no key). Scans over query chunks with a rematerialised body, so the
    backward never holds [T, H, S].
    """
    b, t, h, _ = q_nope.shape
    s_len = kv_nope.shape[1]
    kp = _positions(k_positions, b, s_len)
    has_seg = q_segment_ids is not None
    rows = [(_positions(q_positions, b, t), -1)]
    if has_seg:
        rows.append((jnp.asarray(q_segment_ids, jnp.int32), 0))
        ks = jnp.asarray(k_segment_ids, jnp.int32)
    visible = lambda qpos, qseg=None: visibility(qpos, kp, qseg, ks if has_seg else None)
    return _dense_scan(q_nope, q_rope, kv_nope, k_rope, scale, chunk_size or _dense_chunk(b, t, h, s_len),
                       rows, visible)


def _selected(idx: jax.Array, s_len: int) -> jax.Array:
    """int32 [B, c, K] key lists (-1 unused) -> bool [B, c, S] membership, by one scatter of B·c·K."""
    b, c, _ = idx.shape
    m = jnp.zeros((b, c, s_len + 1), bool)
    m = m.at[jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None], jnp.where(idx >= 0, idx, s_len)].set(True)
    return m[..., :s_len]


def dense_mla(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
              q_segment_ids=None, k_segment_ids=None, chunk_size: int | None = None) -> jax.Array:
    """`dense_mla_with_lse` without the lse: [B,T,H,Dc]."""
    return dense_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, scale=scale, q_positions=q_positions,
                              k_positions=k_positions, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                              chunk_size=chunk_size)[0]


# ----------------------------------------------------------------------------- lightning indexer
def _indexer_chunk(q, w, k, qpos, kpos, qseg, kseg):
    """q [B,c,Hi,Di], w [B,c,Hi], k [B,S,Di] -> f32 [B,c,S] with -inf where not visible."""
    logits = jnp.einsum("bthd,bsd->bths", q.astype(F32), k.astype(F32))
    sc = jnp.einsum("bths,bth->bts", jax.nn.relu(logits), w.astype(F32))
    return jnp.where(visibility(qpos, kpos, qseg, kseg), sc, -jnp.inf)


def _indexer_scan(q, w, k, q_positions, k_positions, q_segment_ids, k_segment_ids, chunk_size, per_chunk,
                  score_chunk=_indexer_chunk, row_bytes=None):
    """Scan `score_chunk` (same signature as `_indexer_chunk`; a Pallas kernel plugs in here) over query
    chunks and apply `per_chunk` to each chunk's f32 [B, c, S] scores. `row_bytes`: working set per
    query row used to size the chunk (default: the [Hi, S] per-head logits of the XLA path)."""
    b, t, hi, _ = q.shape
    s_len = k.shape[-2]  # k [B, S, Di], or a stacked [L, B, S, Di] that `score_chunk` reads one layer of
    qp = _positions(q_positions, b, t)
    kp = _positions(k_positions, b, s_len)
    has_seg = q_segment_ids is not None
    qs = jnp.asarray(q_segment_ids, jnp.int32) if has_seg else jnp.zeros((b, t), jnp.int32)
    ks = jnp.asarray(k_segment_ids, jnp.int32) if has_seg else None
    c = chunk_size or auto_chunk(t, row_bytes or b * hi * s_len * 4 * 2, 256)
    tp = -(-t // c) * c
    xs = tuple(_chunks(_pad_axis1(a, tp, v), c) for a, v in ((q, 0), (w, 0), (qp, -1), (qs, 0)))

    def step(_, x):
        sc = score_chunk(x[0], x[1], k, x[2], kp, x[3] if has_seg else None, ks)
        return None, per_chunk(sc)

    _, out = jax.lax.scan(step, None, xs)
    return jax.tree.map(lambda o: _unchunk(o)[:, :t], out)


def indexer_scores(q, w, k, *, q_positions, k_positions=None, q_segment_ids=None, k_segment_ids=None,
                   chunk_size: int | None = None) -> jax.Array:
    """I[b,t,s] = Σ_h w[b,t,h]·ReLU(q[b,t,h]·k[b,s]) (float32), -inf where key s is not visible."""
    return _indexer_scan(q, w, k, q_positions, k_positions, q_segment_ids, k_segment_ids, chunk_size,
                         lambda sc: sc)


def topk_indices(scores: jax.Array, topk: int) -> jax.Array:
    """Top-k key indices of f32 scores [..., S] -> int32 [..., K]; slots whose score is -inf become -1.

    Ties resolve to the lower index (lax.top_k), the one tie-break rule of every backend
    (`pallas_kernels.indexer`).
    """
    vals, idx = jax.lax.top_k(scores, topk)
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)


def _below_kth_dropped(scores: jax.Array, k: int, passes: int = _PREFILTER_PASSES) -> jax.Array:
    """scores [..., S] with entries certainly below the k-th largest set to -inf: the same `top_k`.

    XLA:CPU's TopK (a heap per row) spends most of its time inserting candidates that later drop out.
    A few vectorised bisection passes find a value m with at least k scores >= m (so m <= the k-th
    largest, and every score at or above it, ties included, is kept); scores below m cannot be selected.
    Rows with fewer than k visible keys are left as they are.
    """
    finite = scores > -jnp.inf
    lo = jnp.min(jnp.where(finite, scores, jnp.inf), axis=-1)
    hi = jnp.max(scores, axis=-1)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo * 0.5 + hi * 0.5  # no overflow at +-f32 max
        enough = jnp.sum(scores >= mid[..., None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, passes, bisect, (lo, hi))
    m = jnp.where(jnp.sum(finite, axis=-1) >= k, lo, -jnp.inf)
    return jnp.where(scores >= m[..., None], scores, -jnp.inf)


def _visible_width(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """1 + the last key index any of these queries may see by position (0 if none): keys past it are
    invisible to the whole chunk. q_pos [B, c], k_pos [B, S] -> int32 scalar."""
    may_see = (k_pos >= 0) & (k_pos <= jnp.max(q_pos))
    return jnp.max(jnp.where(may_see, jnp.arange(k_pos.shape[1], dtype=jnp.int32), -1)) + 1


def indexer_topk(q, w, k, *, topk: int, q_positions, k_positions=None, q_segment_ids=None,
                 k_segment_ids=None, chunk_size: int | None = None) -> jax.Array:
    """Top-`topk` visible keys per query, computed chunk by chunk (peak memory O(T_chunk · S)).

    Each query chunk scores only the keys up to the last one it may see (the causal part: for a
    sequence attending to itself, chunk i of n reads the first (i + 1) / n of the keys), rounded up to
    one of `_WIDTH_BUCKETS` static widths picked per chunk by `lax.switch`. That halves both the score
    matmuls and the `top_k` work of a causal sequence; the keys left out are invisible, so the result is
    the same as scoring all of them. Below `_WIDTH_MIN_KEYS` keys every chunk scores all of them, with
    no bound before `top_k`.
    The selection carries no gradient (the indexer trains on its KL loss).
    """
    q, w, k = jax.lax.stop_gradient((q, w, k))
    b, t, hi, _ = q.shape
    s_len = k.shape[1]
    topk = min(int(topk), s_len)
    qp = _positions(q_positions, b, t)
    kp = _positions(k_positions, b, s_len)
    has_seg = q_segment_ids is not None
    qs = jnp.asarray(q_segment_ids, jnp.int32) if has_seg else None
    ks = jnp.asarray(k_segment_ids, jnp.int32) if has_seg else None
    c = chunk_size or auto_chunk(t, b * hi * s_len * 4 * 2, 256)
    plain = s_len < _WIDTH_MIN_KEYS
    step = -(-s_len // _WIDTH_BUCKETS)
    widths = [min(i * step, s_len) for i in range(1, -(-s_len // step) + 1)]

    def by_width(width, size):
        def run(qc, wc, qpc, qsc):
            if width == 0:
                return jnp.full((b, size, topk), -1, jnp.int32)
            sc = _indexer_chunk(qc, wc, k[:, :width], qpc, kp[:, :width], qsc,
                                None if ks is None else ks[:, :width])
            kw = min(topk, width)
            idx = topk_indices(sc if plain else _below_kth_dropped(sc, kw), kw)
            return jnp.pad(idx, ((0, 0), (0, 0), (0, topk - kw)), constant_values=-1)
        return run

    def fn(start, size, out):
        x = (_rows(q, start, size), _rows(w, start, size), _rows(qp, start, size),
             None if qs is None else _rows(qs, start, size))
        if plain:
            idx = by_width(s_len, size)(*x)
        else:
            n_steps = (_visible_width(x[2], kp) + step - 1) // step  # 0 .. len(widths)
            idx = jax.lax.switch(n_steps, [by_width(wd, size) for wd in [0] + widths], *x)
        return _put_rows(out, idx, start)

    return _over_rows(t, c, fn, jnp.zeros((b, t, topk), jnp.int32))


# ----------------------------------------------------------------------------- test oracle only
def sparse_mla_dense_oracle(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float) -> jax.Array:
    """Dense [B, H, T, S] masked attention built by scattering `indices` into a -inf mask.

    This is what peers ship as "DSA"; dsjax keeps it only as a test oracle and a benchmark baseline.
    """
    b, t, h, _ = q_nope.shape
    s_len = kv_nope.shape[1]
    valid = indices >= 0
    allowed = jnp.zeros((b, t, s_len + 1), bool)
    allowed = jax.vmap(lambda a, i: a.at[jnp.arange(t)[:, None], i].set(True))(
        allowed, jnp.where(valid, indices, s_len))[..., :s_len]
    sc = (jnp.einsum("bthc,bsc->bths", q_nope.astype(F32), kv_nope.astype(F32))
          + jnp.einsum("bthr,bsr->bths", q_rope.astype(F32), k_rope.astype(F32))) * scale
    sc = jnp.where(allowed[:, :, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    return (jnp.einsum("bths,bsc->bthc", p, kv_nope.astype(F32)) / jnp.where(l > 0, l, 1.0)).astype(q_nope.dtype)


def indexer_scores_naive(q, w, k, *, q_positions, k_positions=None) -> jax.Array:
    """Materialising oracle: the whole [B, T, Hi, S] per-head logits at once (tests, benchmarks)."""
    b, t = q.shape[:2]
    logits = jnp.einsum("bthd,bsd->bths", q.astype(F32), k.astype(F32))
    sc = jnp.einsum("bths,bth->bts", jax.nn.relu(logits), w.astype(F32))
    vis = visibility(_positions(q_positions, b, t), _positions(k_positions, b, k.shape[1]), None, None)
    return jnp.where(vis, sc, -jnp.inf)

