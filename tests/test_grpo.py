"""The GRPO objective (spec §10.5) against the formulas written out in numpy, and the properties that make
its parts right: the corrected k3 is an unbiased KL estimate under the sampler (its exact expectation and
gradient by enumeration), off-policy masking drops only negative-advantage sequences that drifted, and the
kept sampling mask gives the sampler's own probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import sampling
from dsjax.train import grpo


def test_advantages_are_group_relative_with_optional_std():
    r = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0, 2.0, 4.0, 6.0], np.float32)
    g = r.reshape(3, 4)
    want = (g - g.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(grpo.advantages(r, 4), want, rtol=1e-6, atol=1e-7)
    want_std = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(grpo.advantages(r, 4, std_normalize=True), want_std, rtol=1e-5, atol=1e-6)
    assert not np.asarray(grpo.advantages(r, 4))[4:8].any()  # a group with no spread teaches nothing
    with pytest.raises(ValueError, match="whole groups"):
        grpo.advantages(r[:10], 4)
    assert grpo.group_stats(r, 4)["groups_with_signal"] == pytest.approx(2 / 3)


def _np_truncate(scaled, top_k, top_p):
    """Top-k then nucleus on one row, the sampler's documented rule: keep ties at the k-th value, then the
    smallest descending prefix whose mass reaches top_p."""
    order = np.argsort(-scaled, kind="stable")
    kth = scaled[order[top_k - 1]] if top_k else -np.inf
    keep = scaled >= kth
    p = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    p /= p.sum()
    mass, kept = 0.0, np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= top_p:
            break
        kept[i] = True
        mass += p[i]
    return kept


def test_kept_mask_gives_the_samplers_probabilities():
    rng = np.random.default_rng(0)
    v, temp, top_k, top_p = 50, 0.7, 12, 0.8
    logits = rng.standard_normal((3, 5, v)).astype(np.float32) * 3
    mask = np.asarray(grpo.sampling_mask(jnp.asarray(logits), temperature=temp, top_k=top_k, top_p=top_p))
    tokens = np.zeros((3, 5), np.int32)
    want = np.zeros((3, 5))
    for i in range(3):
        for t in range(5):
            s = logits[i, t].astype(np.float64) / temp
            kept = _np_truncate(s, top_k, top_p)
            np.testing.assert_array_equal(mask[i, t], kept)
            tokens[i, t] = rng.choice(np.flatnonzero(kept))
            z = np.log(np.exp(s[kept] - s.max()).sum()) + s.max()
            want[i, t] = s[tokens[i, t]] - z
    got = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=temp, mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the sampler's distribution is exactly this one: softmax of sampling.truncate, the code generate runs
    scaled = jnp.asarray(logits.reshape(-1, v)) / temp
    trunc = sampling.truncate(scaled, jnp.int32(top_k), jnp.float32(top_p))
    ref = jnp.take_along_axis(jax.nn.log_softmax(trunc), jnp.asarray(tokens.reshape(-1, 1)), -1).reshape(3, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    full = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=temp)
    assert (np.asarray(full) < np.asarray(got) - 1e-3).all()  # the whole vocabulary: another action space
    bits = grpo.pack_mask(jnp.asarray(mask))
    assert bits.shape == (3, 5, 2) and bits.dtype == jnp.uint32
    np.testing.assert_array_equal(grpo.unpack_mask(bits, v), mask)


def test_corrected_k3_is_unbiased_under_the_sampler():
    """E_{x~π_old}[KL_x] = KL(π_θ ‖ π_ref) and its θ-gradient = ∇KL, by enumeration over the vocabulary;
    the plain k3 (no importance ratio) is biased when π_old ≠ π_θ."""
    rng = np.random.default_rng(1)
    v = 7
    th, old, ref = (jnp.asarray(rng.standard_normal(v), jnp.float32) for _ in range(3))

    def expected(th, corrected=True):
        lp, lo, lr = jax.nn.log_softmax(th), jax.nn.log_softmax(old), jax.nn.log_softmax(ref)
        k = grpo.unbiased_kl(lp, lo, lr) if corrected else jnp.exp(lr - lp) - (lr - lp) - 1
        return jnp.sum(jnp.exp(lo) * k)

    def true_kl(th):
        lp, lr = jax.nn.log_softmax(th), jax.nn.log_softmax(ref)
        return jnp.sum(jnp.exp(lp) * (lp - lr))

    np.testing.assert_allclose(expected(th), true_kl(th), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(expected)(th), jax.grad(true_kl)(th), rtol=1e-4, atol=1e-6)
    assert abs(float(expected(th, corrected=False)) - float(true_kl(th))) > 1e-2


def _np_objective(logp, old, ref, adv, tm, eps, beta, delta):
    """Spec §10.5, term by term, sequence by sequence."""
    total = 0.0
    for i in range(len(adv)):
        toks = np.flatnonzero(tm[i])
        if delta is not None and adv[i] < 0 and np.mean(old[i, toks] - logp[i, toks]) > delta:
            continue  # M_i = 0
        s = 0.0
        for t in toks:
            r = np.exp(logp[i, t] - old[i, t])
            pg = min(r * adv[i], np.clip(r, 1 - eps, 1 + eps) * adv[i])
            kl = r * (np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1)
            s += pg - beta * kl
        total += s / len(toks)
    return -total / len(adv)


@pytest.mark.parametrize("beta,delta", [(0.0, None), (0.05, None), (0.05, 0.1)])
def test_objective_matches_the_formula(beta, delta):
    rng = np.random.default_rng(2)
    n, t = 8, 6
    logp = np.log(rng.uniform(0.05, 0.9, (n, t)))
    old = logp + rng.normal(0, 0.3, (n, t))  # some ratios beyond 1 ± ε: clipping is exercised
    ref = logp + rng.normal(0, 0.2, (n, t))
    adv = np.asarray(grpo.advantages(rng.uniform(0, 1, n).astype(np.float32), 4), np.float64)
    old[np.flatnonzero(adv < 0)[0]] += 0.5  # one negative sequence the policy drifted far from
    tm = (rng.uniform(size=(n, t)) > 0.2).astype(np.float64)
    tm[:, 0] = 1.0  # every sequence has a token
    logp[tm == 0] = -np.inf  # padding outside a masked vocabulary must not poison the loss
    cfg = grpo.GRPOConfig(group_size=4, clip_eps=0.2, kl_beta=beta, offpolicy_delta=delta)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, m = grpo.objective(f32(logp), f32(old), f32(adv), f32(tm), cfg, ref_logp=f32(ref))
    np.testing.assert_allclose(float(loss), _np_objective(logp, old, ref, adv, tm, 0.2, beta, delta), rtol=1e-4)
    assert 0 < float(m["clip_fraction"]) < 1
    if delta is not None:
        assert 0 < float(m["masked_sequences"]) < 1
    g = jax.grad(lambda lp: grpo.objective(lp, f32(old), f32(adv), f32(tm), cfg, ref_logp=f32(ref))[0])(
        f32(np.where(tm > 0, logp, 0.0)))
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[tm == 0].any()  # no loss off the completion


def test_offpolicy_masking_keeps_positive_sequences():
    logp = jnp.zeros((4, 3))
    old = jnp.asarray([[1.0] * 3, [1.0] * 3, [0.01] * 3, [1.0] * 3])  # rows 0, 1, 3 drifted far
    adv = jnp.asarray([-1.0, 1.0, -1.0, 0.0])
    m = grpo.sequence_mask(adv, logp, old, jnp.ones((4, 3)), delta=0.5)
    np.testing.assert_array_equal(m, [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(grpo.sequence_mask(adv, logp, old, jnp.ones((4, 3)), None), 1.0)


def test_bad_settings_are_one_clear_error():
    for kw, needle in [({"group_size": 1}, "group_size"), ({"clip_eps": 0.0}, "clip_eps"),
                       ({"kl_beta": -1.0}, "kl_beta"), ({"offpolicy_delta": -0.1}, "offpolicy_delta")]:
        with pytest.raises(ValueError, match=needle):
            grpo.GRPOConfig(**kw)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.objective(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.zeros(2), jnp.ones((2, 2)),
                       grpo.GRPOConfig(group_size=2, kl_beta=0.1))
