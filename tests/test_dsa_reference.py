"""The XLA DSA path: gathered sparse MLA vs the dense-mask oracle (values and gradients), the dense
causal path, and the chunked indexer top-k. These are the oracles every Pallas kernel is tested against."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as R


def _inputs(key, b=2, t=13, s=29, h=3, dc=16, dr=8, k=7, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    qn = jax.random.normal(ks[0], (b, t, h, dc), dtype)
    qr = jax.random.normal(ks[1], (b, t, h, dr), dtype)
    kvn = jax.random.normal(ks[2], (b, s, dc), dtype)
    kr = jax.random.normal(ks[3], (b, s, dr), dtype)
    # distinct random rows per query (duplicates would be counted twice by a gather, once by a mask)
    idx = jnp.argsort(jax.random.uniform(ks[4], (b, t, s)), axis=-1)[..., :k].astype(jnp.int32)
    drop = jax.random.uniform(ks[5], (b, t, k)) < 0.3
    idx = jnp.where(drop, -1, idx)
    idx = idx.at[0, 3].set(-1)  # a query with no valid slot
    return qn, qr, kvn, kr, idx


@pytest.mark.parametrize("chunk,method", [(None, "auto"), (4, "gather"), (5, "gather"), (4, "dense")])
def test_sparse_matches_dense_mask_oracle(chunk, method):
    qn, qr, kvn, kr, idx = _inputs(jax.random.key(0))
    out, lse = R.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.3, chunk_size=chunk, method=method)
    ref = R.sparse_mla_dense_oracle(qn, qr, kvn, kr, idx, scale=0.3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(out[0, 3]) == 0) and np.isinf(lse[0, 3]).all()
    assert np.isfinite(np.asarray(out)).all()


def test_sparse_gradients_match_autodiff_of_oracle():
    qn, qr, kvn, kr, idx = _inputs(jax.random.key(1))
    w = jax.random.normal(jax.random.key(9), qn.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, idx, scale=0.3) * w)

    g = jax.grad(loss(lambda *a, **k: R.sparse_mla(*a, **k, chunk_size=4)), argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)
    gr = jax.grad(loss(R.sparse_mla_dense_oracle), argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)
    for a, b in zip(g, gr):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_sparse_gather_and_masked_dense_agree_with_gradients():
    """The two XLA formulations `method="auto"` chooses between (by S / K) give the same attention, lse
    and gradients: the masked dense one builds each chunk's K-key mask, never a [T, S] one."""
    qn, qr, kvn, kr, idx = _inputs(jax.random.key(6), t=10, s=12, k=6)  # S <= 2K: "auto" is "dense"
    w = jax.random.normal(jax.random.key(7), qn.shape)
    outs = {m: R.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.3, chunk_size=4, method=m)
            for m in ("gather", "dense", "auto")}
    for m in ("dense", "auto"):
        np.testing.assert_allclose(outs[m][0], outs["gather"][0], atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(np.isinf(outs[m][1]), np.isinf(outs["gather"][1]))
        fin = np.isfinite(np.asarray(outs["gather"][1]))
        np.testing.assert_allclose(np.asarray(outs[m][1])[fin], np.asarray(outs["gather"][1])[fin], atol=2e-5)

    def loss(m):
        def f(qn, qr, kvn, kr):
            o, lse = R.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.3, chunk_size=4, method=m)
            return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return f

    ga = jax.grad(loss("gather"), argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)
    gd = jax.grad(loss("dense"), argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)
    for a, b in zip(gd, ga):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        R.sparse_mla(qn, qr, kvn, kr, idx, scale=0.3, method="mask")


def test_sparse_lse_gradient():
    """The lse output is differentiable too (the indexer KL loss reads attention probabilities)."""
    qn, qr, kvn, kr, idx = _inputs(jax.random.key(2))
    idx = jnp.where(idx < 0, 0, idx)  # all valid: lse is finite everywhere

    def via_kernel(qn, kvn):
        return jnp.sum(R.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.3)[1])

    def via_gather(qn, kvn):
        g = jax.vmap(lambda x, i: x[i])
        s = (jnp.einsum("bthc,btkc->bthk", qn, g(kvn, idx)) + jnp.einsum("bthr,btkr->bthk", qr, g(kr, idx))) * 0.3
        return jnp.sum(jax.nn.logsumexp(s, axis=-1))

    for a, b in zip(jax.grad(via_kernel, (0, 1))(qn, kvn), jax.grad(via_gather, (0, 1))(qn, kvn)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_sparse_bf16_inputs():
    qn, qr, kvn, kr, idx = _inputs(jax.random.key(3), dtype=jnp.bfloat16)
    out = R.sparse_mla(qn, qr, kvn, kr, idx, scale=0.3)
    assert out.dtype == jnp.bfloat16
    ref = R.sparse_mla_dense_oracle(*(a.astype(jnp.float32) for a in (qn, qr, kvn, kr)), idx, scale=0.3)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2)


def test_dense_causal_equals_sparse_with_all_causal_keys_selected():
    b, t = 2, 11
    qn, qr, kvn, kr, _ = _inputs(jax.random.key(4), b=b, t=t, s=t)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], jnp.arange(t)[None, :], -1)
    idx = jnp.broadcast_to(causal, (b, t, t)).astype(jnp.int32)
    dense = R.dense_mla(qn, qr, kvn, kr, scale=0.3, q_positions=pos, k_positions=pos, chunk_size=4)
    np.testing.assert_allclose(dense, R.sparse_mla_dense_oracle(qn, qr, kvn, kr, idx, scale=0.3), atol=2e-5)
    g1 = jax.grad(lambda q: jnp.sum(R.dense_mla(q, qr, kvn, kr, scale=0.3, chunk_size=4) ** 2))(qn)
    g2 = jax.grad(lambda q: jnp.sum(R.sparse_mla(q, qr, kvn, kr, idx, scale=0.3) ** 2))(qn)
    np.testing.assert_allclose(g1, g2, atol=5e-5, rtol=1e-4)


def test_dense_segments_isolate_documents():
    b, t = 1, 10
    qn, qr, kvn, kr, _ = _inputs(jax.random.key(5), b=b, t=t, s=t)
    seg = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    packed = R.dense_mla(qn, qr, kvn, kr, scale=0.3, q_positions=pos, k_positions=pos,
                         q_segment_ids=seg, k_segment_ids=seg)
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        alone = R.dense_mla(qn[:, lo:hi], qr[:, lo:hi], kvn[:, lo:hi], kr[:, lo:hi], scale=0.3)
        np.testing.assert_allclose(packed[:, lo:hi], alone, atol=1e-5)


def test_indexer_topk_matches_naive_scores():
    rng = np.random.default_rng(0)
    b, t, s, hi, di, k = 2, 9, 23, 4, 8, 6
    q = jnp.asarray(rng.standard_normal((b, t, hi, di)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((b, t, hi)).astype(np.float32))
    kk = jnp.asarray(rng.standard_normal((b, s, di)).astype(np.float32))
    qpos = jnp.broadcast_to(jnp.arange(s - t, s), (b, t))  # the last t tokens: chunked prefill / decode
    naive = np.asarray(R.indexer_scores_naive(q, w, kk, q_positions=qpos))
    np.testing.assert_allclose(R.indexer_scores(q, w, kk, q_positions=qpos, chunk_size=4), naive, rtol=1e-6)
    idx = np.asarray(R.indexer_topk(q, w, kk, topk=k, q_positions=qpos, chunk_size=2))
    for bb in range(b):
        for tt in range(t):
            want = set(np.argsort(-naive[bb, tt], kind="stable")[:k])
            assert set(idx[bb, tt]) == want
    # fewer visible keys than k: -1 fills the rest
    early = np.asarray(R.indexer_topk(q, w, kk, topk=k, q_positions=jnp.zeros((b, t), jnp.int32)))
    assert (early[..., 0] == 0).all() and (early[..., 1:] == -1).all()
    assert R.indexer_topk(q, w, kk, topk=100, q_positions=qpos).shape == (b, t, s)


def _tied_indexer_inputs(rng, b, t, s, hi=4, di=8):
    """Small-integer q, k and positive w: many exact score ties and ReLU zeros at the k-th place."""
    q = jnp.asarray(rng.integers(-2, 3, (b, t, hi, di)).astype(np.float32))
    w = jnp.asarray(rng.integers(1, 3, (b, t, hi)).astype(np.float32))
    kk = jnp.asarray(rng.integers(-2, 3, (b, s, di)).astype(np.float32))
    return q, w, kk


@pytest.mark.parametrize("widths", [True, False])
@pytest.mark.parametrize("layout", ["causal", "cache_offset", "packed", "shuffled_keys"])
def test_indexer_topk_causal_widths_give_the_full_width_result(layout, widths, monkeypatch):
    """`indexer_topk` scores each chunk only up to the last key it may see (one of 8 static widths) and
    drops scores below a bisected bound before `top_k`. Neither may change a single index or its order,
    ties included, against `top_k` over every key's score (`indexer_scores`). Short key ranges take the
    plain path (`_WIDTH_MIN_KEYS`); `widths` forces the width path at this small S."""
    if widths:
        monkeypatch.setattr(R, "_WIDTH_MIN_KEYS", 0)
    rng = np.random.default_rng(1)
    b, t, s, k = 2, 40, 40, 6
    q, w, kk = _tied_indexer_inputs(rng, b, t, s)
    kw = {}
    qpos = kpos = jnp.broadcast_to(jnp.arange(t), (b, t))
    if layout == "cache_offset":  # a prefill chunk of 24 queries over a 40-row cache, 8 rows unfilled
        q, w = q[:, :24], w[:, :24]
        qpos = jnp.broadcast_to(jnp.arange(8, 32), (b, 24))
        kpos = jnp.broadcast_to(jnp.where(jnp.arange(s) < 32, jnp.arange(s), -1), (b, s))
    elif layout == "packed":
        seg = jnp.broadcast_to(jnp.repeat(jnp.arange(4), 10), (b, t))
        qpos = kpos = jnp.broadcast_to(jnp.tile(jnp.arange(10), 4), (b, t))
        kw = dict(q_segment_ids=seg, k_segment_ids=seg)
    elif layout == "shuffled_keys":  # key positions in no order: the width rule must still be exact
        kpos = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]).astype(np.int32))
    want = R.topk_indices(R.indexer_scores(q, w, kk, q_positions=qpos, k_positions=kpos, chunk_size=64, **kw), k)
    for chunk in (4, 7, None):
        got = R.indexer_topk(q, w, kk, topk=k, q_positions=qpos, k_positions=kpos, chunk_size=chunk, **kw)
        np.testing.assert_array_equal(got, want)


def test_below_kth_bound_keeps_every_tie():
    rng = np.random.default_rng(2)
    sc = jnp.asarray(rng.integers(0, 4, (64, 50)).astype(np.float32))  # heavy ties
    sc = sc.at[:8, 3:].set(-jnp.inf)  # rows with fewer visible keys than k
    for k in (1, 5, 17):
        kept = R._below_kth_dropped(sc, k)
        np.testing.assert_array_equal(R.topk_indices(kept, k), R.topk_indices(sc, k))
        kth = np.sort(np.asarray(sc), axis=-1)[:, -k]
        assert (np.asarray(kept) >= kth[:, None]).sum(-1).min() >= k
