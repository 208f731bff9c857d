"""The MoE gate (vs HF's router) and the dropless dispatch (vs a per-token dense reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsjax import Config, init_params
from dsjax import moe as moe_lib

CFG = Config.preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                    hidden_size=64, moe_intermediate_size=32)


def _hf_router(cfg, w, bias):
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32TopkRouter

    hc = DeepseekV32Config(hidden_size=cfg.hidden_size, n_routed_experts=cfg.n_routed_experts,
                           num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                           topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor)
    r = DeepseekV32TopkRouter(hc)
    with torch.no_grad():
        r.weight.copy_(torch.as_tensor(np.asarray(w).T))
        r.e_score_correction_bias.copy_(torch.as_tensor(np.asarray(bias)))
    return r


def test_gate_matches_hf_router_with_groups_and_bias():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, CFG.hidden_size)).astype(np.float32)
    w = (0.3 * rng.standard_normal((CFG.hidden_size, CFG.n_routed_experts))).astype(np.float32)
    bias = (0.5 * rng.standard_normal(CFG.n_routed_experts)).astype(np.float32)
    r = moe_lib.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), CFG)
    with torch.no_grad():
        _, hw, hi = _hf_router(CFG, w, bias)(torch.as_tensor(x))
    ours = np.asarray(r.experts)
    hi = hi.numpy()
    for n in range(len(x)):
        assert set(ours[n]) == set(hi[n]), n
        order = np.argsort(ours[n]), np.argsort(hi[n])
        np.testing.assert_allclose(np.asarray(r.weights)[n][order[0]], hw.numpy()[n][order[1]], rtol=1e-5, atol=1e-7)
    # the bias changed some choices (it is exercised), and the weights do not include it
    unbiased = moe_lib.route(jnp.asarray(x), jnp.asarray(w), jnp.zeros_like(jnp.asarray(bias)), CFG)
    assert (np.sort(np.asarray(unbiased.experts), 1) != np.sort(ours, 1)).any()
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1), CFG.routed_scaling_factor, rtol=1e-6)


def test_gate_respects_group_limit():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((256, CFG.hidden_size)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((CFG.hidden_size, CFG.n_routed_experts)).astype(np.float32))
    r = moe_lib.route(x, w, jnp.zeros(CFG.n_routed_experts), CFG)
    groups = np.asarray(r.experts) // (CFG.n_routed_experts // CFG.n_group)
    assert max(len(set(g)) for g in groups) <= CFG.topk_group


def _dense_reference(x, r, experts):
    """Per-(token, slot) loop over the chosen experts: the definition of the routed output."""
    x, wts, ids = np.asarray(x, np.float64), np.asarray(r.weights), np.asarray(r.experts)
    g, u, d = (np.asarray(experts[k], np.float64) for k in ("gate", "up", "down"))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = ids[n, s]
            a = x[n] @ g[e]
            out[n] += wts[n, s] * ((a / (1 + np.exp(-a))) * (x[n] @ u[e])) @ d[e]
    return out


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
def test_dispatch_matches_dense_reference(impl):
    cfg = CFG.replace(moe_impl=impl, moe_block_size=8)
    p = init_params(cfg, jax.random.key(0))["moe"]["moe"]
    p = jax.tree.map(lambda a: a[0] * 10, p)
    x = jax.random.normal(jax.random.key(1), (37, cfg.hidden_size))
    r = moe_lib.route(x, p["router"], p["bias"], cfg)
    y = moe_lib.dispatch(x, r, p["experts"], cfg)
    np.testing.assert_allclose(np.asarray(y), _dense_reference(x, r, p["experts"]), rtol=2e-4, atol=1e-5)


def test_blocked_and_ragged_dot_agree_with_gradients():
    """The CPU blocked grouped matmul is a drop-in for ragged_dot, gradients included, with empty groups."""
    rng = np.random.default_rng(3)
    sizes = np.array([5, 0, 17, 1, 0, 9, 0, 32], np.int32)
    x = jnp.asarray(rng.standard_normal((sizes.sum(), 24)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((8, 24, 12)).astype(np.float32))
    gs = jnp.asarray(sizes)

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w)))

    ragged = lambda x, w: jax.lax.ragged_dot(x, w, gs)
    blocked = lambda x, w: moe_lib._grouped_matmul_blocked(x, w, gs, block=8)
    np.testing.assert_allclose(blocked(x, w), ragged(x, w), rtol=1e-5, atol=1e-5)
    gr = jax.grad(lambda x, w: loss(ragged, x, w), argnums=(0, 1))(x, w)
    gb = jax.grad(lambda x, w: loss(blocked, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(gr, gb):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_moe_stats():
    cfg = CFG
    p = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(0))["moe"]["moe"])
    x = jax.random.normal(jax.random.key(1), (2, 10, cfg.hidden_size))
    _, stats = moe_lib.moe(p, x, cfg)
    assert stats.load.shape == (2, cfg.n_routed_experts)
    np.testing.assert_allclose(stats.load.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats.mean_score.sum(-1), 1.0, rtol=1e-5)
