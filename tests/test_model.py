"""Model structure: params tree and logical axes, cache decode consistency, MTP wiring, and clear errors
for bad inputs (O(L) memory: test_memory_scaling.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import cache as cache_lib
from dsjax import model

CFG = dsjax.Config.preset("tiny", index_topk=16)


@pytest.fixture(scope="module")
def params():
    return dsjax.init_params(CFG, jax.random.key(0))


def test_params_tree_shapes_and_axes(params):
    specs = dsjax.param_specs(CFG)
    axes = dsjax.param_axes(CFG)
    abstract = dsjax.abstract_params(CFG)
    is_spec = lambda x: isinstance(x, dsjax.params.ParamSpec)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for p, s, a in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=is_spec),
                       jax.tree.leaves(abstract)):
        assert p.shape == s.shape == a.shape and p.dtype == a.dtype
        assert len(s.axes) == len(s.shape)
    assert jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert params["dense"]["attn"]["wq_b"].shape == (CFG.n_dense_layers, CFG.q_lora_rank, CFG.num_attention_heads,
                                                      CFG.qk_head_dim)
    assert params["moe"]["moe"]["experts"]["gate"].shape[:2] == (CFG.n_moe_layers, CFG.n_routed_experts)
    assert params["moe"]["moe"]["router"].dtype == jnp.float32
    same = dsjax.init_params(CFG, jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))


def test_671b_param_count():
    n = dsjax.count_params(dsjax.abstract_params(dsjax.Config.preset("deepseek-v3.2")))
    assert 680e9 < n < 690e9  # 671B main model + ~0.85B indexers + ~11.6B unique MTP (spec §1.1)


def test_prefill_then_decode_equals_full_forward(params):
    b, length, cap, prefill = 2, 40, 64, 20  # cap and length > index_topk: decode-time DSA prunes
    tokens = jax.random.randint(jax.random.key(1), (b, length), 0, CFG.vocab_size)
    full = dsjax.forward(params, tokens, CFG)
    step = jax.jit(lambda p, t, pos, c: model.forward_hidden(p, t, CFG, positions=pos, cache=c))
    aux = step(params, tokens[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (b, prefill)),
               cache_lib.init_cache(CFG, b, cap))
    outs, cache = [model.lm_head(params, aux.hidden)], aux.cache
    for t in range(prefill, length):
        aux = step(params, tokens[:, t:t + 1], jnp.full((b, 1), t), cache)
        outs.append(model.lm_head(params, aux.hidden))
        cache = aux.cache
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5 * float(jnp.abs(full).max()))


def test_mtp_reads_embedding_first(params):
    """eh_proj's input is [enorm(embedding), hnorm(hidden)]: zeroing the hidden half removes the
    dependence on the main hidden state, zeroing the embedding half does not."""
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, CFG.vocab_size)
    h1 = jax.random.normal(jax.random.key(3), (1, 10, CFG.hidden_size))
    h2 = jax.random.normal(jax.random.key(4), (1, 10, CFG.hidden_size))
    d = CFG.hidden_size

    def with_eh(keep_first_half):
        eh = params["mtp"]["eh_proj"]
        eh = eh.at[d:].set(0) if keep_first_half else eh.at[:d].set(0)
        return {**params, "mtp": {**params["mtp"], "eh_proj": eh}}

    p_emb = with_eh(True)
    a, b = (dsjax.mtp_logits(p_emb, h, tokens, CFG) for h in (h1, h2))
    np.testing.assert_allclose(a, b, atol=1e-6)
    p_hid = with_eh(False)
    a, b = (dsjax.mtp_logits(p_hid, h, tokens, CFG) for h in (h1, h2))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    assert dsjax.mtp_logits(params, h1, tokens, CFG).shape == (1, 10, CFG.vocab_size)


@pytest.mark.parametrize("tokens,needle", [
    (np.array([[1, 2, 512]]), "outside the vocabulary"),
    (np.array([[1, -3, 2]]), "outside the vocabulary"),
    (np.array([1, 2, 3]), r"shape \[batch, length\]"),
    (np.array([[1.0, 2.0]]), "integer token ids"),
    (np.zeros((1, 2049), np.int32), "max_position_embeddings"),
])
def test_bad_tokens_raise_clear_errors(params, tokens, needle):
    with pytest.raises(ValueError, match=needle):
        dsjax.forward(params, tokens, CFG)


def test_forward_under_user_jit(params):
    tokens = jnp.ones((1, 8), jnp.int32)
    a = jax.jit(lambda p, t: dsjax.forward(p, t, CFG))(params, tokens)
    np.testing.assert_allclose(a, dsjax.forward(params, tokens, CFG), atol=1e-6)
