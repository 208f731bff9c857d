"""The lightning indexer's training loss (spec §10, notes §4.7): KL from the main attention to the indexer.

For query t, the target is the main attention's probabilities summed over heads and L1-normalised,
p_t = normalise(Σ_h softmax_h), and the loss is KL(p_t || softmax(I_t)) with I the index scores:
  * `dense_kl`  (stage 1, dense warm-up): over every causal key of t;
  * `sparse_kl` (stage 2, sparse training): over the selected set S_t only (the top-k indices the sparse
    attention used), both distributions renormalised on S_t.
The main attention is the absorbed MLA: scores = scale·(q_nope·kv + q_rope·k_rope) per head.

Both return the mean over queries that see at least one key (a f32 scalar). The target is
stop-gradient'ed: gradients reach only the indexer's q [B, T, Hi, Di], w [B, T, Hi] and k [B, S, Di].

Memory: everything runs in query chunks, so only [B, c, H, S] (dense) or [B, c, H, K] (sparse) exists at a
time, never [T, S]. The gradient is computed in the same pass from its closed form, dI = softmax(I) − p
on the visible (selected) keys, back-propagated through I = Σ_h w·ReLU(q·k) per chunk (a `custom_vjp`),
so the backward neither stores per-chunk residuals across the scan nor recomputes the target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import reference as R

F32 = jnp.float32
MODES = ("dense_warmup", "sparse", "dense_recall")  # the last one is an evaluation, not a loss
_sg = jax.lax.stop_gradient


def check_mode(mode: str | None, config, *, has_cache: bool = False) -> None:
    """One clear error for an indexer_loss request the model cannot honour."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"indexer_loss={mode!r}: expected one of {MODES} or None.")
    if not config.has_indexer:
        raise ValueError(f"indexer_loss={mode!r} needs a V3.2 config with an indexer "
                         f"(model_type={config.model_type!r} has none).")
    if has_cache:
        raise ValueError(f"indexer_loss={mode!r} is a training loss; call without a KV cache.")


# ----------------------------------------------------------------------------- per-chunk pieces
def _index_logits(q, w, keys):
    """Per-head logits L and scores I; keys [B, S, Di] (shared) or [B, c, K, Di] (per query)."""
    spec = "bthd,bsd->bths" if keys.ndim == 3 else "bthd,btsd->bths"
    logits = jnp.einsum(spec, q.astype(F32), keys.astype(F32))  # [B, c, Hi, N]
    return logits, jnp.einsum("bths,bth->bts", jax.nn.relu(logits), w.astype(F32))


def _kl_rows(p, scores, allowed):
    """Per-row KL(p || softmax(scores)) over `allowed` entries and its gradient w.r.t. the scores.

    p, scores [B, c, N] f32, allowed bool [B, c, N]. Rows with nothing allowed contribute 0.
    """
    s = jnp.where(allowed, scores, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(s - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    z = jnp.where(z > 0, z, 1.0)
    log_q = s - m - jnp.log(z)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
    d_scores = jnp.where(allowed, e / z - p, 0.0)
    return kl, d_scores


def _normalise(p):
    tot = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(tot > 0, tot, 1.0)


def _index_grads(d_scores, logits, q, w, keys):
    """Back-propagate dI [B, c, N] through I = Σ_h w·ReLU(q·k) -> (dq, dw, dkeys)."""
    dw = jnp.einsum("bts,bths->bth", d_scores, jax.nn.relu(logits))
    dl = jnp.where(logits > 0, d_scores[:, :, None, :] * w.astype(F32)[..., None], 0.0)
    if keys.ndim == 3:
        dq = jnp.einsum("bths,bsd->bthd", dl, keys.astype(F32))
        dk = jnp.einsum("bths,bthd->bsd", dl, q.astype(F32))
    else:
        dq = jnp.einsum("bths,btsd->bthd", dl, keys.astype(F32))
        dk = jnp.einsum("bths,bthd->btsd", dl, q.astype(F32))
    return dq, dw, dk


def _dense_target(qn, qr, kvn, kr, vis, scale, lse=None):
    """Head-summed, L1-normalised causal attention probabilities [B, c, S] of one query chunk. lse: the
    attention's own log-sum-exp [B, c, H] (from `pallas_kernels.dense_mla_with_lse`), else computed here."""
    sc = (jnp.einsum("bthc,bsc->bths", qn.astype(F32), kvn.astype(F32))
          + jnp.einsum("bthr,bsr->bths", qr.astype(F32), kr.astype(F32))) * scale
    if lse is not None:  # one pass: no max / sum over the keys (lse = +inf for an empty query -> P = 0)
        p = jnp.where(vis[:, :, None, :], jnp.exp(sc - lse.astype(F32)[..., None]), 0.0)
        return _normalise(jnp.sum(p, axis=2))
    sc = jnp.where(vis[:, :, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return _normalise(jnp.sum(p, axis=2))


def _sparse_target(qn, qr, kvn, kr, idx, lse, scale):
    """Head-summed, L1-normalised attention probabilities on the selected slots [B, c, K]."""
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    kn, kro = R._gather_rows(kvn, safe).astype(F32), R._gather_rows(kr, safe).astype(F32)
    sc = (jnp.einsum("bthc,btkc->bthk", qn.astype(F32), kn)
          + jnp.einsum("bthr,btkr->bthk", qr.astype(F32), kro)) * scale
    p = jnp.where(valid[:, :, None, :], jnp.exp(sc - lse.astype(F32)[..., None]), 0.0)  # lse=+inf -> 0
    return _normalise(jnp.sum(p, axis=2))


# ----------------------------------------------------------------------------- the chunked scan
def _dense_select(x, shared, scale, k):
    """Stage 1: target over every visible key; the indexer keys are shared by the chunk's queries."""
    qnc, qrc, qpc, qsc = x[:4]
    kvn, kr, kp, ks = shared
    vis = R.visibility(qpc, kp, qsc, ks)
    return _dense_target(qnc, qrc, kvn, kr, vis, scale, x[4] if len(x) > 4 else None), vis, k, None


def _sparse_select(x, shared, scale, k):
    """Stage 2: target on the selected slots; the indexer keys are gathered per query."""
    qnc, qrc, ic, lc = x
    kvn, kr = shared
    valid = ic >= 0
    safe = jnp.where(valid, ic, 0)
    return _sparse_target(qnc, qrc, kvn, kr, ic, lc, scale), valid, R._gather_rows(k, safe), safe


_STAGES = {  # select function, pad value of each per-query target input
    "dense": (_dense_select, (0, 0, -1, 0)),  # q_nope, q_rope, q_positions, q_segment_ids
    "dense_lse": (_dense_select, (0, 0, -1, 0, jnp.inf)),  # ... and the attention's lse
    "sparse": (_sparse_select, (0, 0, -1, jnp.inf)),  # q_nope, q_rope, indices, lse
}


def _kl_scan(stage, scale, chunk, q, w, k, per_query, shared, with_grad):
    """(mean KL, (dq, dw, dk) of the mean or None) by a scan over query chunks."""
    select, pads = _STAGES[stage]
    t = q.shape[1]
    tp = -(-t // chunk) * chunk
    xs = tuple(R._chunks(R._pad_axis1(a, tp, v), chunk) for a, v in zip((q, w) + per_query, (0, 0) + pads))

    def step(dk, x):
        qc, wc = x[:2]
        p, allowed, keys, slots = select(x[2:], shared, scale, k)
        logits, scores = _index_logits(qc, wc, keys)
        kl, d_scores = _kl_rows(p, scores, allowed)
        row = jnp.any(allowed, axis=-1)
        out = (jnp.sum(jnp.where(row, kl, 0.0)), jnp.sum(row))
        if not with_grad:
            return dk, (out, None, None)
        dq, dw, dkeys = _index_grads(d_scores, logits, qc, wc, keys)
        # gathered keys: scatter-add back (unused slots carry dI = 0)
        dk = dk + dkeys if slots is None else R._scatter_add_rows(dk, slots, dkeys)
        return dk, (out, dq, dw)

    dk, ((kl, n), dq, dw) = jax.lax.scan(step, jnp.zeros(k.shape, F32), xs)
    n = jnp.maximum(jnp.sum(n), 1).astype(F32)
    grads = None if not with_grad else tuple(
        g / n for g in (R._unchunk(dq)[:, :t], R._unchunk(dw)[:, :t], dk))
    return jnp.sum(kl) / n, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kl(stage, scale, chunk, q, w, k, per_query, shared):
    return _kl_scan(stage, scale, chunk, q, w, k, per_query, shared, False)[0]


def _kl_fwd(stage, scale, chunk, q, w, k, per_query, shared):
    loss, grads = _kl_scan(stage, scale, chunk, q, w, k, per_query, shared, True)
    # empty arrays carry the input dtypes (dtypes themselves are not valid residuals)
    tags = tuple(jnp.zeros((0,), x.dtype) for x in (q, w, k))
    return loss, (grads, tags, per_query, shared)


def _zero_cotangents(xs):
    """Zero cotangents of the target-side inputs (stop-gradient'ed by definition; ints get float0)."""
    return tuple(jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
                 else np.zeros(x.shape, jax.dtypes.float0) for x in xs)


def _kl_bwd(stage, scale, chunk, res, g):
    grads, tags, per_query, shared = res
    return tuple((g * d).astype(tag.dtype) for d, tag in zip(grads, tags)) + (
        _zero_cotangents(per_query), _zero_cotangents(shared))


_kl.defvjp(_kl_fwd, _kl_bwd)


# ----------------------------------------------------------------------------- public losses
def _visibility_inputs(q_positions, k_positions, q_segment_ids, k_segment_ids, b, t, s_len):
    """[B, T] / [B, S] int32 positions and segment ids (all one segment when none are given)."""
    has_seg = q_segment_ids is not None
    qs = jnp.asarray(q_segment_ids, jnp.int32) if has_seg else jnp.zeros((b, t), jnp.int32)
    ks = jnp.asarray(k_segment_ids, jnp.int32) if has_seg else jnp.zeros((b, s_len), jnp.int32)
    return R._positions(q_positions, b, t), R._positions(k_positions, b, s_len), qs, ks


def dense_kl(q, w, k, q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions, k_positions=None,
             q_segment_ids=None, k_segment_ids=None, lse=None, chunk_size: int | None = None) -> jax.Array:
    """Stage-1 indexer loss: mean over queries of KL(p_t || softmax(I_t)) over every visible key.

    Indexer side (differentiable): q [B, T, Hi, Di], w [B, T, Hi] (scales folded in), k [B, S, Di].
    Main attention (target, stop-gradient): q_nope [B, T, H, Dc], q_rope [B, T, H, Dr],
    kv_nope [B, S, Dc], k_rope [B, S, Dr], softmax `scale`. Visibility as `pallas_kernels.dense_mla`:
    k_pos <= q_pos, k_pos >= 0, equal segment ids. lse: f32 [B, T, H] of that attention
    (`pallas_kernels.dense_mla_with_lse`, the flash kernels' statistics): the target is then exp(S - lse) in
    one pass; without it each chunk normalises its own scores. Returns a f32 scalar.
    """
    b, t, h, _ = q_nope.shape
    s_len = kv_nope.shape[1]
    qp, kp, qs, ks = _visibility_inputs(q_positions, k_positions, q_segment_ids, k_segment_ids, b, t, s_len)
    hi = q.shape[2]
    c = chunk_size or R.auto_chunk(t, b * (h + 2 * hi) * s_len * 4 * 2, 256)
    qn, qr, kvn, kr = (_sg(x) for x in (q_nope, q_rope, kv_nope, k_rope))
    if lse is not None:
        return _kl("dense_lse", float(scale), int(c), q, w, k, (qn, qr, qp, qs, _sg(lse).astype(F32)),
                   (kvn, kr, kp, ks))
    return _kl("dense", float(scale), int(c), q, w, k, (qn, qr, qp, qs), (kvn, kr, kp, ks))


def sparse_kl(q, w, k, q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, lse=None,
              chunk_size: int | None = None, attention_backend: str | None = None,
              interpret: bool = False) -> jax.Array:
    """Stage-2 indexer loss: mean over queries of KL(p_t || softmax(I_t)) on the selected set only.

    Shapes as `dense_kl`, plus indices int32 [B, T, K] (the top-k the sparse attention used; < 0 =
    unused slot). lse: f32 [B, T, H] of that attention (`pallas_kernels.sparse_mla_with_lse`); computed
    here with `attention_backend` when not given. Returns a f32 scalar.
    """
    b, t, h, _ = q_nope.shape
    kk = indices.shape[-1]
    target = tuple(_sg(x) for x in (q_nope, q_rope, kv_nope, k_rope))
    indices = indices.astype(jnp.int32)
    if lse is None:
        lse = pallas_kernels.sparse_mla_with_lse(*target, indices, scale=scale, backend=attention_backend,
                                                 interpret=interpret)[1]
    hi, di = q.shape[2], q.shape[3]
    row = b * kk * ((h + 2 * hi) * 4 * 2 + (kv_nope.shape[-1] + q_rope.shape[-1] + 2 * di) * 4)
    c = chunk_size or R.auto_chunk(t, row, 256)
    qn, qr, kvn, kr = target
    return _kl("sparse", float(scale), int(c), q, w, k, (qn, qr, indices, _sg(lse).astype(F32)), (kvn, kr))


def dense_recall(q, w, k, q_nope, q_rope, kv_nope, k_rope, *, scale: float, topk: int, q_positions,
                 k_positions=None, q_segment_ids=None, k_segment_ids=None, chunk_size: int | None = None
                 ) -> jax.Array:
    """How well the indexer picks what the attention would: for each query with more than `topk` visible
    keys, the fraction of the indexer's top-`topk` keys that are among the `topk` keys of highest
    head-summed attention probability (the target of `dense_kl`). Mean over those queries (f32 scalar;
    0 when no query has more than `topk` keys). Inputs as `dense_kl`; no gradient. Chunked like it: the
    probabilities of [B, c, S] keys exist one query chunk at a time.
    """
    b, t, h, _ = q_nope.shape
    s_len = kv_nope.shape[1]
    qp, kp, qs, ks = _visibility_inputs(q_positions, k_positions, q_segment_ids, k_segment_ids, b, t, s_len)
    c = chunk_size or R.auto_chunk(t, b * (h + 2 * q.shape[2]) * s_len * 4 * 2, 256)
    tp = -(-t // c) * c
    per_query = tuple(_sg(x) for x in (q, w, q_nope, q_rope)) + (qp, qs)
    xs = tuple(R._chunks(R._pad_axis1(a, tp, v), c) for a, v in zip(per_query, (0, 0, 0, 0, -1, 0)))
    shared = tuple(_sg(x) for x in (kv_nope, k_rope)) + (kp, ks)
    kk = min(topk, s_len)

    def step(carry, x):
        qc, wc = x[:2]
        p, vis, _, _ = _dense_select(x[2:], shared, scale, None)
        _, scores = _index_logits(qc, wc, _sg(k))
        scores = jnp.where(vis, scores, -jnp.inf)
        p = jnp.where(vis, p, -1.0)
        p_kth = jax.lax.top_k(p, kk)[0][..., -1:]  # the attention's top-k: p >= its k-th value
        picked = jax.lax.top_k(scores, kk)[1]
        hit = jnp.take_along_axis(p >= p_kth, picked, axis=-1)
        row = jnp.sum(vis, axis=-1) > topk
        rec = jnp.where(row, jnp.mean(hit.astype(F32), axis=-1), 0.0)
        return carry, (jnp.sum(rec), jnp.sum(row))

    _, (rec, n) = jax.lax.scan(step, None, xs)
    return jnp.sum(rec) / jnp.maximum(jnp.sum(n), 1).astype(F32)
