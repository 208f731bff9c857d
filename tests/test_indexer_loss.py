"""The indexer KL loss (spec §10): chunked dense (warm-up) and sparse (selected-set) losses and their
closed-form gradients against autodiff of naive materialising references, and the model plumbing
(`indexer_loss=` through forward_with_aux): logits unchanged, gradients only reach the indexer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
import pallas_kernels
from dsjax import indexer_loss, model
from pallas_kernels import reference as R
from test_indexer_kernels import np_init

SCALE = 0.3


def _inputs(seed, b=2, t=13, s=13, h=3, dc=16, dr=8, hi=4, di=8):
    rng = np.random.default_rng(seed)  # numpy: jax.random compiles once per shape
    n = lambda i, shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ind = (n(0, (b, t, hi, di)), n(1, (b, t, hi)), n(2, (b, s, di)))
    tgt = (n(3, (b, t, h, dc)), n(4, (b, t, h, dr)), n(5, (b, s, dc)), n(6, (b, s, dr)))
    return ind, tgt


def _naive_kl(ind, tgt, allowed):
    """KL(normalise(Σ_h softmax_h) || softmax(I)) with every [B, T, H, S] / [B, T, S] tensor materialised,
    restricted to the bool mask `allowed` [B, T, S]; mean over rows with an allowed key."""
    q, w, k = ind
    qn, qr, kvn, kr = (jax.lax.stop_gradient(x) for x in tgt)
    sc = (jnp.einsum("bthc,bsc->bths", qn, kvn) + jnp.einsum("bthr,bsr->bths", qr, kr)) * SCALE
    probs = jax.nn.softmax(jnp.where(allowed[:, :, None], sc, -1e30), axis=-1) * allowed[:, :, None]
    p = jnp.sum(probs, axis=2)
    p = jax.lax.stop_gradient(p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30))
    scores = jnp.einsum("bths,bth->bts", jax.nn.relu(jnp.einsum("bthd,bsd->bths", q, k)), w)
    log_q = jax.nn.log_softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    kl = jnp.sum(jnp.where(allowed & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), -1)
    row = jnp.any(allowed, -1)
    return jnp.sum(jnp.where(row, kl, 0.0)) / jnp.sum(row)


def _check_against_naive(loss_fn, ind, tgt, allowed):
    got, g = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(*ind)
    want, g_ref = jax.jit(jax.value_and_grad(lambda *a: _naive_kl(a, tgt, allowed), argnums=(0, 1, 2)))(*ind)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(want) > 0.01
    for a, b_ in zip(g, g_ref):
        assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(b_)).max() > 0
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)


def test_dense_kl_value_and_gradients_match_autodiff_of_naive():
    """Packed rows (positions restart, segments), a padding query that sees nothing, chunk 5 over T = 13."""
    ind, tgt = _inputs(0)
    pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, -1]] * 2)
    seg = jnp.asarray([[0] * 5 + [1] * 7 + [2]] * 2)
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg)
    allowed = R.visibility(pos, pos, seg, seg)

    def loss(q, w, k):
        return indexer_loss.dense_kl(q, w, k, *tgt, scale=SCALE, chunk_size=5, **kw)

    _check_against_naive(loss, ind, tgt, allowed)
    # the target is stop-gradient'ed: nothing flows into the main attention's inputs
    g_tgt = jax.jit(jax.grad(lambda qn, kvn: indexer_loss.dense_kl(*ind, qn, tgt[1], kvn, tgt[3], scale=SCALE,
                                                                   chunk_size=5, **kw), argnums=(0, 1)))(tgt[0], tgt[2])
    assert all(not np.asarray(x).any() for x in g_tgt)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu"])
def test_dense_kl_from_the_attentions_lse(backend):
    """The warm-up's path: the target recomputed from the dense attention's lse (the GPU flash kernel's, in
    interpret mode, or the XLA scan's) gives the same loss and gradients as the naive reference."""
    ind, tgt = _inputs(1)
    pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, -1]] * 2)
    seg = jnp.asarray([[0] * 5 + [1] * 7 + [2]] * 2)
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg)
    lse = pallas_kernels.dense_mla_with_lse(*tgt, scale=SCALE, backend=backend, interpret=backend != "xla",
                                            **kw)[1]
    assert np.isposinf(np.asarray(lse)[:, -1]).all()  # the padding query sees nothing

    def loss(q, w, k):
        return indexer_loss.dense_kl(q, w, k, *tgt, scale=SCALE, chunk_size=5, lse=lse, **kw)

    _check_against_naive(loss, ind, tgt, R.visibility(pos, pos, seg, seg))


def test_dense_recall_matches_a_numpy_count():
    """Recall of the attention's top-k by the indexer's top-k, counted in numpy on the full [B, T, S]
    arrays (test oracle), over packed rows; and 1.0 when the indexer scores are the attention itself."""
    ind, tgt = _inputs(3, t=24, s=24)
    pos = jnp.asarray([list(range(16)) + list(range(8))] * 2)
    seg = jnp.asarray([[1] * 16 + [2] * 8] * 2)
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg)
    topk = 4
    got = float(indexer_loss.dense_recall(*ind, *tgt, scale=SCALE, topk=topk, chunk_size=7, **kw))
    allowed = np.asarray(R.visibility(pos, pos, seg, seg))
    q, w, k = (np.asarray(x, np.float64) for x in ind)
    qn, qr, kvn, kr = (np.asarray(x, np.float64) for x in tgt)
    sc = (np.einsum("bthc,bsc->bths", qn, kvn) + np.einsum("bthr,bsr->bths", qr, kr)) * SCALE
    sc = np.where(allowed[:, :, None], sc, -np.inf)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    p = (pr / pr.sum(-1, keepdims=True)).sum(2)
    scores = np.einsum("bths,bth->bts", np.maximum(np.einsum("bthd,bsd->bths", q, k), 0), w)
    hits = []
    for b in range(2):
        for t in range(24):
            if allowed[b, t].sum() <= topk:
                continue
            vis = np.flatnonzero(allowed[b, t])
            best = set(vis[np.argsort(-p[b, t, vis], kind="stable")[:topk]])
            picked = vis[np.argsort(-scores[b, t, vis], kind="stable")[:topk]]
            hits.append(np.mean([i in best for i in picked]))
    assert 0.0 < np.mean(hits) < 1.0
    np.testing.assert_allclose(got, np.mean(hits), atol=1e-6)
    # no query sees more than 40 keys: nothing to recall, and the mean over no rows is 0, not NaN
    assert float(indexer_loss.dense_recall(*ind, *tgt, scale=SCALE, topk=40, **kw)) == 0.0


def test_sparse_kl_value_and_gradients_match_autodiff_of_naive():
    """Selected sets with unused (-1) slots and one query with none; T != S; lse from the sparse attention."""
    b, t, s, kk = 2, 11, 29, 7
    ind, tgt = _inputs(1, b=b, t=t, s=s)
    rng = np.random.default_rng(2)  # distinct rows per query (a set), some unused slots, one empty query
    idx = np.argsort(rng.random((b, t, s)), axis=-1)[..., :kk]
    idx = np.where(rng.random((b, t, kk)) < 0.3, -1, idx)
    idx[1, 4] = -1
    idx = jnp.asarray(idx, jnp.int32)
    allowed = jax.vmap(lambda i: jnp.zeros((t, s + 1), bool).at[jnp.arange(t)[:, None], i].set(True))(
        jnp.where(idx >= 0, idx, s))[..., :s]

    def loss(q, w, k, lse=None):
        return indexer_loss.sparse_kl(q, w, k, *tgt, idx, scale=SCALE, lse=lse, chunk_size=4)

    _check_against_naive(loss, ind, tgt, allowed)  # lse computed inside by pallas_kernels.sparse_mla_with_lse


@pytest.fixture(scope="module")
def tiny():
    cfg = dsjax.Config.preset("tiny", index_topk=16, num_hidden_layers=2, first_k_dense_replace=1,
                              num_nextn_predict_layers=0)
    params = np_init(dsjax.param_specs(cfg), cfg, seed=0)
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params)  # peakier attention, non-trivial KL
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)  # L > topk
    return cfg, params, tokens


def _is_indexer(path):
    return any(getattr(k, "key", None) == "indexer" for k in path)


def test_model_indexer_loss_modes(tiny):
    cfg, params, tokens = tiny
    fwd = jax.jit(model.forward_with_aux, static_argnames=("config", "indexer_loss"))
    base, aux_none = fwd(params, tokens, cfg)
    assert aux_none.indexer_loss is None
    sparse, aux = fwd(params, tokens, cfg, indexer_loss="sparse")
    np.testing.assert_allclose(sparse, base, rtol=1e-6, atol=1e-6)  # same DSA attention
    warm, aux_w = fwd(params, tokens, cfg, indexer_loss="dense_warmup")
    dense = fwd(params, tokens, cfg.replace(index_topk=64))[0]
    np.testing.assert_allclose(warm, dense, rtol=1e-6, atol=1e-6)  # stage 1: dense attention
    assert np.abs(np.asarray(warm - base)).max() > 1e-4
    for a in (aux, aux_w):
        assert a.indexer_loss.shape == () and np.isfinite(a.indexer_loss) and a.indexer_loss > 0
    with pytest.raises(ValueError, match="expected one of"):
        model.forward_hidden(params, tokens, cfg, indexer_loss="kl")
    with pytest.raises(ValueError, match="needs a V3.2 config"):
        model.forward_hidden(params, tokens, dsjax.Config.preset("tiny-v3"), indexer_loss="sparse")


def test_model_gradients_reach_only_the_indexer(tiny):
    """Sparse stage: the indexer loss trains only indexer params; the LM loss never reaches them."""
    cfg, params, tokens = tiny

    def losses(p):
        logits, aux = model.forward_with_aux(p, tokens, cfg, indexer_loss="sparse")
        lm = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
        return jnp.stack([lm, aux.indexer_loss])

    jac = jax.jit(jax.jacrev(losses))(params)
    flat = jax.tree_util.tree_flatten_with_path(jac)[0]
    for path, g in flat:
        g_lm, g_idx = np.asarray(g[0]), np.asarray(g[1])
        if _is_indexer(path):
            assert not g_lm.any(), path
        else:
            assert not g_idx.any(), path
    idx_leaves = {jax.tree_util.keystr(p): np.abs(np.asarray(g[1])).max() for p, g in flat if _is_indexer(p)}
    assert all(v > 0 for k, v in idx_leaves.items() if "k_norm" not in k), idx_leaves
    assert any(np.abs(np.asarray(g[0])).max() > 0 for p, g in flat if not _is_indexer(p))
