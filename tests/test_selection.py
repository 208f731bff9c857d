"""Replaying a forward's discrete choices: the DSA keys and the MoE routing (`selection`).

A forward records what its indexers and routers chose (`record_selection`, `dsjax.train.step.selection`);
another forward given that `selection` attends those keys and routes to those experts instead of choosing
again. RL needs it (keep the rollout's routing and sparse pattern), and so does any exact comparison across
summation orders, where a near tie can flip (tests/test_train_mesh.py). Oracles: the sparse-attention
definition over the given keys (a numpy softmax over exactly those keys), the per-token MoE definition with
the given experts (tests/test_moe.py), and the unreplayed forward itself.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import attention, model, moe as moe_lib
from dsjax.rope import cos_sin
from dsjax.train import step as step_lib
from test_moe import _dense_reference
from test_train import CFG, TC, make_batch

B, L = 2, 32  # two 16-token documents per row; index_topk = 8: DSA prunes


@pytest.fixture(scope="module")
def params():
    return dsjax.init_params(CFG, jax.random.key(0))


_FORWARD = jax.jit(model.forward_with_aux, static_argnames=("config", "record_selection"))


def _forward(params, tokens, selection=None, record=False):
    return _FORWARD(params, tokens, CFG, selection=selection, record_selection=record)


def test_a_recorded_selection_replays_to_the_same_logits(params):
    tokens = make_batch(seed=1, b=B)["tokens"]
    logits, aux = _forward(params, tokens, record=True)
    sel = aux.selection
    assert set(sel) == {"dense", "moe", "moe_experts"}
    assert sel["dense"].shape == (B, L, CFG.n_dense_layers, CFG.index_topk)
    assert sel["moe_experts"].shape == (B, L, CFG.n_moe_layers, CFG.num_experts_per_tok)
    replayed, aux2 = _forward(params, tokens, sel, record=True)
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
    for k in sel:
        np.testing.assert_array_equal(np.asarray(aux2.selection[k]), np.asarray(sel[k]))
    # other params choose other keys and experts; replayed here they change the result
    other = _forward(dsjax.init_params(CFG, jax.random.key(7)), tokens, record=True)[1].selection
    for name in sel:
        changed = _forward(params, tokens, {name: other[name]})[0]
        assert float(jnp.max(jnp.abs(changed - logits))) > 1e-3, name


def _random_selection(rng, b, t, k):
    """Distinct causal keys per query, chosen at random (not by an indexer); valid slots first, -1 after."""
    sel = np.full((b, t, k), -1, np.int32)
    for i in range(b):
        for q in range(t):
            n = min(q + 1, k)
            sel[i, q, :n] = rng.choice(q + 1, n, replace=False)
    return sel


def test_replayed_keys_are_exactly_the_keys_attended(params):
    """mla(selection=S) against a numpy softmax over exactly the keys in S (the sparse attention definition)."""
    p = jax.tree.map(lambda a: a[0], params["moe"])["attn"]
    t = 24
    x = jax.random.normal(jax.random.key(3), (B, t, CFG.hidden_size), CFG.compute_dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    cos, sin = cos_sin(CFG, pos)
    sel = _random_selection(np.random.default_rng(0), B, t, CFG.index_topk)
    out, _, _, used = attention.mla(p, x, cos, sin, CFG, positions=pos, selection=jnp.asarray(sel))
    np.testing.assert_array_equal(np.asarray(used), sel)
    q, kv = attention.project(p, x, cos, sin, CFG)
    qa, qp = np.asarray(q.q_abs, np.float64), np.asarray(q.q_pe, np.float64)
    c, kp = np.asarray(kv.kv, np.float64), np.asarray(kv.k_pe, np.float64)
    o = np.zeros(qa.shape)
    for i in range(B):
        for j in range(t):
            keys = sel[i, j][sel[i, j] >= 0]
            s = (qa[i, j] @ c[i, keys].T + qp[i, j] @ kp[i, keys].T) * CFG.softmax_scale  # [H, n]
            w = np.exp(s - s.max(-1, keepdims=True))
            o[i, j] = (w / w.sum(-1, keepdims=True)) @ c[i, keys]
    want = attention.output(p, jnp.asarray(o, jnp.float32), CFG)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-4, atol=1e-5)
    # and it is not what the indexer would have picked
    own = attention.mla(p, x, cos, sin, CFG, positions=pos)[3]
    assert (np.sort(np.asarray(own), -1) != np.sort(sel, -1)).any()


def test_replayed_routing_uses_the_given_experts_with_fresh_weights(params):
    p = jax.tree.map(lambda a: a[0] * 10, params["moe"]["moe"])
    x = jax.random.normal(jax.random.key(1), (37, CFG.hidden_size))
    rng = np.random.default_rng(2)
    chosen = np.stack([rng.choice(CFG.n_routed_experts, CFG.num_experts_per_tok, replace=False)
                       for _ in range(37)]).astype(np.int32)
    r = moe_lib.route(x, p["router"], p["bias"], CFG, jnp.asarray(chosen))
    np.testing.assert_array_equal(np.asarray(r.experts), chosen)
    s = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(p["router"], np.float64))))
    w = np.take_along_axis(s, chosen, 1)
    w = w / w.sum(-1, keepdims=True) * CFG.routed_scaling_factor  # the unbiased scores of those experts
    np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5)
    y = moe_lib.dispatch(x, r, p["experts"], CFG)
    np.testing.assert_allclose(np.asarray(y), _dense_reference(x, r, p["experts"]), rtol=2e-4, atol=1e-5)
    assert (np.sort(np.asarray(moe_lib.route(x, p["router"], p["bias"], CFG).experts), 1)
            != np.sort(chosen, 1)).any()  # the router's own choice differs


def test_the_train_step_replays_the_batch_selection(params):
    tc = dataclasses.replace(TC, grad_accum=1)
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=3, b=B).items()}
    select = jax.jit(lambda p, b: step_lib.selection(p, b, CFG, tc))
    sel = select(params, batch)
    assert set(sel) == {"dense", "moe", "moe_experts", "mtp", "mtp_experts"}
    fn = step_lib.compiled_step(CFG, tc)
    init = lambda: step_lib.init_state(jax.tree.map(jnp.copy, params), CFG, tc, jax.random.key(1))
    _, m_own = fn(init(), batch)
    _, m_same = fn(init(), {**batch, "selection": sel})
    assert float(m_same["loss"]) == float(m_own["loss"])  # the same choices: the same computation
    other = select(dsjax.init_params(CFG, jax.random.key(7)), batch)
    _, m_other = fn(init(), {**batch, "selection": other})
    assert abs(float(m_other["loss"]) - float(m_own["loss"])) > 1e-4


def test_a_selection_that_cannot_apply_is_one_clear_error(params):
    tokens = make_batch(seed=1, b=B)["tokens"]
    sel = _forward(params, tokens, record=True)[1].selection
    with pytest.raises(ValueError, match="'mtp'"):
        _forward(params, tokens, {"mtp": sel["dense"][:, :, 0]})
    short = tokens[:, :CFG.index_topk]  # every causal key fits in the top-k: attention is dense, nothing to replay
    with pytest.raises(ValueError, match="every causal key"):
        _forward(params, short, {"dense": sel["dense"][:, :CFG.index_topk]})
