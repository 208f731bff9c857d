"""The packed latent cache (`PackedLatents`, the TPU kernels' native rows): decode over it equals decode over
the plain cache on the XLA path, and with the TPU kernels (interpret mode) the layer scan hands them the whole
stacked cache and the layer index, which they read in place (tests/test_tpu_compile.py compiles that decode
step for TPU and checks that no layer of the cache is copied)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import cache as cache_lib
from dsjax import model as model_lib
from dsjax.latents import PackedLatents

# kernel widths (latent 256, rope 64), two layers, top-31 of a 40-slot cache: the sparse path runs
CFG = dsjax.Config.preset("tiny", index_topk=31, num_hidden_layers=2, first_k_dense_replace=2, kv_lora_rank=256,
                          qk_rope_head_dim=64, index_head_dim=64)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _step(params, tokens, positions, cache, cfg):
    aux = model_lib.forward_hidden(params, tokens, cfg, positions=positions, cache=cache)
    return model_lib.lm_head(params, aux.hidden), aux.cache


def _decode(params, tokens, cfg, packed, prefill=33, steps=3, cap=40):
    b = tokens.shape[0]
    cache = cache_lib.layer_caches(cache_lib.init_cache(cfg, b, cap, jnp.bfloat16, packed=packed))
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    logits, cache = _step(params, jnp.asarray(tokens[:, :prefill]), pos, cache, cfg)
    outs = [logits]
    for t in range(prefill, prefill + steps):
        logits, cache = _step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.full((b, 1), t, jnp.int32), cache, cfg)
        outs.append(logits)
    return np.concatenate([np.asarray(o) for o in outs], axis=1), cache


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape).astype(a.dtype)),
                          dsjax.abstract_params(CFG))
    tokens = rng.integers(0, CFG.vocab_size, (2, 36))
    ref, ref_cache = _decode(params, tokens, CFG.replace(attention_backend="xla"), packed=False)
    return params, tokens, ref, ref_cache


def test_packed_cache_layout_and_errors():
    c = cache_lib.init_cache(CFG, 2, 40, jnp.bfloat16, packed=True)
    assert isinstance(c["dense"], PackedLatents) and c["dense"].rows.shape == (2, 2, 40, 256)
    assert c["dense"].rows.dtype == jnp.uint32 and c["dense"].index_k.shape == (2, 2, 40, 64)
    assert not isinstance(cache_lib.init_cache(CFG, 2, 40)["dense"], PackedLatents)  # CPU default: plain
    with pytest.raises(ValueError, match="bf16 cache"):
        cache_lib.init_cache(CFG, 2, 40, jnp.float32, packed=True)
    with pytest.raises(ValueError, match="kv_lora_rank % 256"):
        cache_lib.init_cache(dsjax.Config.preset("tiny"), 2, 40, jnp.bfloat16, packed=True)


def test_decode_over_packed_cache_equals_plain_cache(setup):
    """Same bf16 values either way: prefill + 3 decode steps agree to f32 rounding, and the packed cache
    unpacks to the plain one."""
    params, tokens, ref, ref_cache = setup
    got, cache = _decode(params, tokens, CFG.replace(attention_backend="xla"), packed=True)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    for layer in range(2):
        unpacked = cache_lib.read(cache["dense"], jnp.int32(layer), CFG)
        plain = cache_lib.read(ref_cache["dense"], jnp.int32(layer), CFG)
        for a, b in zip(unpacked, plain):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_tpu_kernels_read_the_stacked_packed_cache(setup):
    """The TPU sparse-MLA and indexer kernels (interpret mode) over the stacked packed cache + layer index
    match the XLA path over the plain cache (bf16 compute in the kernel)."""
    params, tokens, ref, _ = setup
    cfg = CFG.replace(attention_backend="pallas_tpu", indexer_backend="pallas_tpu", kernel_interpret=True)
    cache = cache_lib.layer_caches(cache_lib.init_cache(cfg, 2, 40, jnp.bfloat16, packed=True))
    jaxpr = str(jax.make_jaxpr(lambda p, c: _step.__wrapped__(p, jnp.asarray(tokens[:, :1]),
                                                              jnp.full((2, 1), 33, jnp.int32), c, cfg))(params, cache))
    assert "sparse_mla_fwd_tpu" in jaxpr and "dsjax_indexer_scores" in jaxpr
    got, _ = _decode(params, tokens, cfg, packed=True)
    np.testing.assert_allclose(got, ref, atol=3e-3, rtol=2e-2)
