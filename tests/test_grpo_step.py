"""The GRPO stage of the one training step (`TrainConfig(stage="grpo")`): on a recorded rollout it
minimises grpo.objective of the replayed forward's log-probs, trains only the LoRA adapters (the reference is
the base with them off, so the KL starts at 0), and moves the policy toward the positive-advantage samples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import lora
from dsjax.train import grpo, losses, schedule, step as step_lib

CFG = dsjax.Config.preset("tiny", index_topk=8)
G = 4
GC = grpo.GRPOConfig(group_size=G, kl_beta=0.05, temperature=1.0)
LC = lora.LoraConfig(rank=4, targets=("attn", "shared"))
TC = step_lib.TrainConfig(stage="grpo", grpo=GC, lora=LC, remat=None, bias_update_rate=0.0,
                          optim=schedule.OptimConfig(learning_rate=2e-2, warmup_steps=0, total_steps=10))


@pytest.fixture(scope="module")
def setup():
    params = dsjax.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    prompts = [p for p in (rng.integers(2, CFG.vocab_size, 10).tolist(), rng.integers(2, CFG.vocab_size, 7).tolist())
               for _ in range(G)]  # each prompt G times: its group
    res = dsjax.generate_with_stats(params, CFG, prompts, max_new_tokens=8, temperature=1.0, top_k=50, seed=0,
                                    record=True)
    rewards = np.array([np.mean(np.asarray(t) % 2 == 0) for t in res.tokens], np.float32)  # a toy reward
    batch = grpo.rollout_batch(prompts, res, CFG)
    batch["advantages"] = np.asarray(grpo.advantages(rewards, G))
    assert np.abs(batch["advantages"]).max() > 0
    return params, jax.tree.map(jnp.asarray, batch)


def test_grpo_step_is_the_objective_and_trains_only_the_adapters(setup):
    params, batch = setup
    adapters = lora.init(CFG, LC, jax.random.key(2))
    lp_fn = jax.jit(lambda p, b: grpo.policy_logprobs(p, b, CFG, temperature=1.0))
    lp = lp_fn(lora.apply(params, adapters, CFG, LC), batch)
    ref = lp_fn(params, batch)
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(ref))  # adapters start at zero: π_θ = π_ref
    np.testing.assert_allclose(lp, batch["old_logprob"], atol=1e-4)  # and = the sampler's (nothing changed)
    want, _ = grpo.objective(lp, batch["old_logprob"], batch["advantages"], batch["completion"], GC, ref_logp=ref)

    state = step_lib.init_state(jax.tree.map(jnp.copy, params), CFG, TC, jax.random.key(1),
                                adapters=jax.tree.map(jnp.copy, adapters))
    fn = step_lib.compiled_step(CFG, TC)
    state, m = fn(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5, atol=1e-7)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-7) and float(m["clip_fraction"]) == 0.0
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base is frozen (and the reference)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state["lora"]), jax.tree.leaves(adapters)))  # the adapters moved

    # the update moves probability toward positive-advantage samples and away from negative ones
    new = lp_fn(lora.apply(state["params"], state["lora"], CFG, LC), batch)
    gain = np.sum(np.asarray(new - lp) * np.asarray(batch["completion"]), axis=1)
    adv = np.asarray(batch["advantages"])
    assert gain[adv > 0].mean() > 0 > gain[adv < 0].mean(), (gain, adv)
    g = jax.grad(lambda p: jnp.sum(grpo.policy_logprobs(p, batch, CFG, temperature=1.0)))(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))  # prompt / padding rows too
    state, m2 = fn(state, batch)
    assert float(m2["kl"]) > 0 and float(m2["loss"]) < float(m["loss"])


def test_grpo_settings_are_checked():
    with pytest.raises(ValueError, match="needs LoRA"):
        dataclasses.replace(TC, lora=None)
    with pytest.raises(ValueError, match="TrainConfig.grpo"):
        step_lib.TrainConfig(stage="grpo")
    with pytest.raises(ValueError, match="temperature"):
        grpo.GRPOConfig(temperature=0.0)


def test_chunked_logprobs_equal_the_whole_head(setup):
    """Long completions: the log-probs (and their gradient) over strided position chunks, each holding only
    its own logits and unpacking its own kept-vocabulary bits, equal those of the whole [N, T, V] head."""
    params, batch = setup
    n, t = batch["targets"].shape
    small = n * CFG.vocab_size * 4 * (t // 3)  # under a third of the positions' logits: several chunks
    assert 1 < losses.ce_chunks(n, t, CFG.vocab_size, small) < t or t % 2  # (a prime T: one position a chunk)

    def total(p, chunk):
        lp = grpo.policy_logprobs(p, batch, CFG, temperature=0.8, chunk_bytes=chunk)
        return jnp.sum(lp * batch["advantages"][:, None]), lp

    (_, whole), g_whole = jax.jit(jax.value_and_grad(lambda p: total(p, None), has_aux=True))(params)
    (_, parts), g_parts = jax.jit(jax.value_and_grad(lambda p: total(p, small), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_parts), jax.tree.leaves(g_whole)):
        b = np.asarray(b)  # summation order differs (chunked head): a bound relative to the leaf's scale
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
