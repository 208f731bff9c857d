"""Rollouts for RL from the same compiled prefill/decode (`generate_with_stats(record=True)`), and the test RL
stacks most often fail: the training forward's log-probs of the sampled tokens equal the sampler's when
nothing has changed. A tiny V3.2 (DSA prunes: rows longer than index_topk; grouped routing) samples with
temperature, top-k and top-p; the training forward over prompt + completion then recomputes every sampled
token's log-prob, with the rollout's MoE routing and DSA keys replayed (keep routing / keep the selection)
and over the recorded kept vocabulary (keep the sampling mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import sampling
from dsjax.train import grpo

CFG = dsjax.Config.preset("tiny", index_topk=8)
TEMP, TOP_K, TOP_P = 1.0, 40, 0.9
N_NEW = 12


@pytest.fixture(scope="module")
def rollout():
    params = dsjax.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, CFG.vocab_size, n).tolist() for n in (5, 11, 16, 9)]
    res = dsjax.generate_with_stats(params, CFG, prompts, max_new_tokens=N_NEW, temperature=TEMP, top_k=TOP_K,
                                    top_p=TOP_P, seed=3, record=True)
    return params, prompts, res


_POLICY_LOGPROBS = jax.jit(grpo.policy_logprobs, static_argnames=("config", "temperature", "keep_sampling_mask"))


def _logprobs(params, batch, keep_mask=True):
    b = {k: jax.tree.map(jnp.asarray, v) for k, v in batch.items()}
    return np.asarray(_POLICY_LOGPROBS(params, b, CFG, temperature=TEMP, keep_sampling_mask=keep_mask))


def test_the_record_describes_the_sampling(rollout):
    params, prompts, res = rollout
    words = -(-CFG.vocab_size // 32)
    for p, toks, rec in zip(prompts, res.tokens, res.record):
        assert len(toks) == N_NEW and rec["logprobs"].shape == (N_NEW,) and rec["masks"].shape == (N_NEW, words)
        kept = np.asarray(sampling.unpack_mask(jnp.asarray(rec["masks"]), CFG.vocab_size))
        assert kept[np.arange(N_NEW), toks].all()  # every sampled token was in its kept vocabulary
        assert (kept.sum(-1) <= TOP_K).all() and (kept.sum(-1) >= 1).all()
        assert (rec["logprobs"] <= 0).all()
        fed = len(p) + N_NEW - 1
        assert rec["selection"]["moe_experts"].shape == (fed, CFG.n_moe_layers, CFG.num_experts_per_tok)
        assert rec["selection"]["dense"].shape == (fed, CFG.n_dense_layers, CFG.index_topk)
    same = dsjax.generate(params, CFG, prompts, max_new_tokens=N_NEW, temperature=TEMP, top_k=TOP_K, top_p=TOP_P,
                          seed=3)
    assert same == res.tokens  # recording does not change what is sampled


def test_training_logprobs_equal_the_samplers_with_routing_and_keys_replayed(rollout):
    params, prompts, res = rollout
    batch = grpo.rollout_batch(prompts, res, CFG)
    assert batch["tokens"].shape[1] > CFG.index_topk and set(batch["selection"]) == {"dense", "moe", "moe_experts"}
    lp = _logprobs(params, batch)
    on = batch["completion"] > 0
    assert on.sum() == len(prompts) * N_NEW
    err = np.abs(lp - batch["old_logprob"])[on]
    assert err.max() < 1e-4, err.max()  # fp32 noise: the same keys, experts and vocabulary as the sampler
    # the replay is what the forward follows: another row's routing and keys give other log-probs
    wrong = {**batch, "selection": {k: np.roll(v, 1, axis=0) for k, v in batch["selection"].items()}}
    assert np.median(np.abs(_logprobs(params, wrong) - batch["old_logprob"])[on]) > 1e-2
    # without the kept vocabulary the action space is another one: every truncated token's log-prob is lower
    full = _logprobs(params, batch, keep_mask=False)
    assert (full[on] < batch["old_logprob"][on] - 1e-3).all()


def test_without_replay_the_choices_are_the_trainings_own(rollout):
    """Routing and keys chosen again by the training forward: the same log-probs wherever no near tie
    flipped (decode and a full forward sum in other orders), so nearly all tokens agree to fp32 noise."""
    params, prompts, res = rollout
    for kw in ({"keep_routing": False}, {"keep_selection": False}, {"keep_routing": False, "keep_selection": False}):
        batch = grpo.rollout_batch(prompts, res, CFG, **kw)
        assert ("moe_experts" in batch.get("selection", {})) == kw.get("keep_routing", True)
        on = batch["completion"] > 0
        err = np.abs(_logprobs(params, batch) - batch["old_logprob"])[on]
        assert np.mean(err < 1e-4) >= 0.9, (kw, np.sort(err)[-5:])


def test_record_needs_sampling():
    params = dsjax.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature > 0"):
        dsjax.generate_with_stats(params, CFG, [[3, 4, 5]], max_new_tokens=2, record=True)
