"""Samplers: top-k / top-p truncation against a numpy oracle, the empirical distribution of sampled tokens,
greedy, per-token keys, and parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import sampling


def _oracle_probs(logits, temperature, top_k, top_p):
    """Probabilities after temperature, top-k then top-p (HF order), in float64 numpy."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    k = top_k if top_k > 0 else z.size
    kept = order[:k]
    p = np.exp(z[kept] - z[kept].max())
    p /= p.sum()
    mass = np.cumsum(p) - p
    keep[kept[(mass < top_p) | (top_p >= 1.0)]] = True
    out = np.where(keep, np.exp(z - z.max()), 0.0)
    return out / out.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.3), (0, 0.999)])
def test_truncate_matches_oracle(top_k, top_p):
    logits = jax.random.normal(jax.random.key(top_k), (4, 50)) * 2.0
    got = sampling.truncate(logits / 0.7, jnp.int32(top_k), jnp.float32(top_p))
    for row, g in zip(np.asarray(logits), np.asarray(got)):
        want = _oracle_probs(row, 0.7, top_k, top_p) > 0
        np.testing.assert_array_equal(np.isfinite(g), want)


def test_sampled_frequencies_follow_the_truncated_distribution():
    logits = jnp.array([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    n = 20000
    keys = sampling.token_keys(jax.random.key(0), jnp.zeros((n,), jnp.int32), jnp.arange(n))
    draw = jax.jit(lambda k: sampling.sample(jnp.broadcast_to(logits, (n, 6)), k, greedy=False,
                                             temperature=0.8, top_p=0.9, top_k=5))
    freq = np.bincount(np.asarray(draw(keys)), minlength=6) / n
    want = _oracle_probs(logits[0], 0.8, 5, 0.9)
    assert want[-1] == 0 and want[-2] == 0  # both truncations remove something here
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_greedy_and_keys():
    logits = jax.random.normal(jax.random.key(1), (3, 40))
    keys = sampling.token_keys(jax.random.key(0), jnp.arange(3), jnp.zeros(3, jnp.int32))
    got = sampling.sample(logits, keys, greedy=True, temperature=0.0, top_p=1.0, top_k=0)
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))
    k1 = jax.random.key_data(sampling.token_keys(jax.random.key(0), jnp.array([0, 0, 1]), jnp.array([0, 1, 0])))
    k2 = jax.random.key_data(sampling.token_keys(jax.random.key(0), jnp.array([0, 0, 1]), jnp.array([0, 1, 0])))
    np.testing.assert_array_equal(k1, k2)
    assert len({tuple(np.asarray(k).ravel()) for k in k1}) == 3


@pytest.mark.parametrize("kw,needle", [({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                       ({"top_k": 2.5}, "top_k"), ({"top_k": 1000}, "exceeds the vocabulary")])
def test_sampling_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        sampling.Sampling(**kw).check(vocab_size=100)
