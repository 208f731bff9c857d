"""Memory is O(L) in every compiled program that touches attention: the forward, the decode step and the train
step of each stage (sft, indexer_warmup, sparse, grpo). Each is compiled (not run) for abstract inputs at L and 2L
on the `tiny` preset (top-k 64, so DSA prunes), and the post-optimisation HLO is scanned: no buffer of
>= 0.75·L² elements (an L×L mask or score array; the largest legitimate buffers are per query chunk,
chunk × heads × L = L²/2 at L = 2048), and temp memory and the largest buffer grow <= 2.1x per doubling.

Before the visibility inputs were tied to each layer's activations (`attention.visibility_in_place`), every
train stage held pred[L/256, B, 256, L] per layer stack: JAX's scan partial evaluation computed all query
chunks' causal masks at once, outside the layer scan."""

import jax
import jax.numpy as jnp
import pytest

import dsjax
import hlo_memory
from dsjax import cache as cache_lib, model
from dsjax.train import schedule, step as step_lib

# No MTP block: it is one more (unscanned) block of the same code, and half the compile time here.
CFG = dsjax.Config.preset("tiny", max_position_embeddings=8192, num_nextn_predict_layers=0)
LENGTHS = (2048, 4096)
C = 0.75


def _batch(length: int) -> dict:
    i = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return {"tokens": i, "targets": i, "weights": jax.ShapeDtypeStruct((1, length), jnp.float32),
            "segment_ids": i, "positions": i}


def _check(fn, make_args):
    prof = hlo_memory.profile(fn, make_args, LENGTHS)
    hlo_memory.check_linear(prof, c=C)
    return prof


def test_scan_helper_catches_a_quadratic_buffer():
    """The checker itself: an L×L mask is flagged, and so is quadratic growth of temp memory."""
    def quadratic(x):
        vis = jnp.arange(x.shape[1])[None, :] <= jnp.arange(x.shape[1])[:, None]
        return jnp.sum(jnp.where(vis, x[0][:, None] * x[0][None, :], 0.0), axis=1)

    prof = hlo_memory.profile(quadratic, lambda n: (jax.ShapeDtypeStruct((1, n), jnp.float32),), (256, 512))
    with pytest.raises(AssertionError, match="L²"):
        hlo_memory.check_linear(prof, c=C)


def test_forward_is_linear_in_length():
    _check(lambda p, t: model.forward_with_aux(p, t, CFG)[0],
           lambda n: (dsjax.abstract_params(CFG), jax.ShapeDtypeStruct((1, n), jnp.int32)))


def test_decode_step_is_linear_in_cache_length():
    def step(p, cache, tok, pos):
        aux = model.forward_hidden(p, tok, CFG, positions=pos, cache=cache)
        return model.lm_head(p, aux.hidden[:, -1]), aux.cache

    def args(n):
        cache = jax.eval_shape(lambda: cache_lib.layer_caches(cache_lib.init_cache(CFG, 1, n)))
        one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        return dsjax.abstract_params(CFG), cache, one, one

    _check(step, args)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "indexer_warmup", "sparse"])
def test_train_step_is_linear_in_length(stage):
    tc = step_lib.TrainConfig(stage=stage, optim=schedule.OptimConfig(warmup_steps=0, total_steps=10))
    params = dsjax.abstract_params(CFG)
    opt = jax.eval_shape(lambda p: step_lib.make_optimizer(tc.optim).init(step_lib.trainable({"params": p}, tc)),
                         params)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt,
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    prof = _check(lambda s, b: step_lib.train_step(s, b, config=CFG, tc=tc), lambda n: (state, _batch(n)))
    assert prof[LENGTHS[1]]["temp"] < 512 << 20  # tiny at 4K tokens: a few hundred MB at most


@pytest.mark.slow
def test_grpo_step_is_linear_in_length():
    """The RL step too: LoRA with the KL reference forward, the rollout's routing and DSA keys replayed
    ([1, L, layers, top-k] inputs: linear), the kept-vocabulary bits, log-probs over position chunks."""
    from dsjax import lora
    from dsjax.train import grpo

    tc = step_lib.TrainConfig(stage="grpo", grpo=grpo.GRPOConfig(group_size=2, kl_beta=0.01),
                              lora=lora.LoraConfig(rank=4), ce_chunk_bytes=1 << 20,
                              optim=schedule.OptimConfig(warmup_steps=0, total_steps=10))
    params = dsjax.abstract_params(CFG)
    adapters = jax.eval_shape(lambda: lora.init(CFG, tc.lora, jax.random.key(0)))
    opt = jax.eval_shape(lambda p, a: step_lib.make_optimizer(tc.optim).init(
        step_lib.trainable({"params": p, "lora": a}, tc)), params, adapters)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "lora": adapters, "opt_state": opt,
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}

    def batch(n):
        def rows(*tail, dtype=jnp.int32):
            return jax.ShapeDtypeStruct((1, n) + tail, dtype)

        k = CFG.index_topk
        return {"tokens": rows(), "targets": rows(), "positions": rows(), "segment_ids": rows(),
                "completion": rows(dtype=jnp.float32), "old_logprob": rows(dtype=jnp.float32),
                "mask_bits": rows(CFG.vocab_size // 32, dtype=jnp.uint32),
                "advantages": jax.ShapeDtypeStruct((1,), jnp.float32),
                "selection": {"dense": rows(CFG.n_dense_layers, k), "moe": rows(CFG.n_moe_layers, k),
                              "moe_experts": rows(CFG.n_moe_layers, CFG.num_experts_per_tok)}}

    prof = _check(lambda s, b: step_lib.train_step(s, b, config=CFG, tc=tc), lambda n: (state, batch(n)))
    assert prof[LENGTHS[1]]["temp"] < 512 << 20
