"""The KV-cache pytree: its size per token per layer against the spec's numbers, its logical axes, slot
writes (padding dropped), and the official FP8 indexer-key storage (lossless; decode equals forward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import cache as cache_lib
from dsjax import fp8, indexer, model, params as params_lib
from dsjax.latents import Latents
from sharding.rules import RULES

V32 = dsjax.Config.preset("deepseek-v3.2")
V3 = dsjax.Config.preset("deepseek-v3")
V32_FP8 = V32.replace(indexer_numerics="official_fp8")


def test_bytes_per_token_match_spec():
    # Spec §4.3: latent 512 + rope key 64 values = 1152 B in bf16; §5.5/§13: bf16 index key = 256 B.
    b = cache_lib.bytes_per_token(V32)
    assert b["latent"] + b["rope_key"] == 1152
    assert b["index_key"] == 256 and b["total"] == 1408
    assert cache_lib.bytes_per_token(V3)["total"] == 1152
    # Spec §5.5: the official indexer key cache is 128 FP8 bytes + one fp32 scale = 132 B.
    assert cache_lib.bytes_per_token(V32_FP8)["index_key"] == 132
    assert cache_lib.bytes_per_token(V32_FP8)["total"] == 1284
    assert cache_lib.bytes_per_token(V32, jnp.float32)["total"] == 2816


@pytest.mark.parametrize("cfg,per_layer", [(V32, 1408), (V3, 1152), (V32_FP8, 1284)])
def test_cache_bytes_of_the_671b_model(cfg, per_layer):
    """The allocated pytree (measured with eval_shape) is exactly layers x batch x slots x per-layer bytes,
    plus 4 bytes of length per sequence; the MTP block adds one layer."""
    b, s = 3, 40
    assert cache_lib.cache_bytes(cfg, b, s) == 61 * b * s * per_layer + 4 * b
    assert cache_lib.cache_bytes(cfg, b, s, mtp=True) == 62 * b * s * per_layer + 4 * b


@pytest.mark.parametrize("name,numerics", [("tiny", "bf16"), ("tiny-v3", "bf16"), ("tiny", "official_fp8")])
def test_cache_axes_cover_every_leaf(name, numerics):
    cfg = dsjax.Config.preset(name, indexer_numerics=numerics)
    cache = cache_lib.init_cache(cfg, 2, 8, mtp=True)
    axes = cache_lib.cache_axes(cfg, mtp=True)
    is_axes = lambda x: isinstance(x, tuple) and not isinstance(x, (Latents, cache_lib.IndexKey))
    flat_axes, tree_axes = jax.tree.flatten(axes, is_leaf=is_axes)
    flat, tree = jax.tree.flatten(cache)
    assert tree_axes == tree
    for a, x in zip(flat_axes, flat):
        assert len(a) == x.ndim and "cache_batch" in a and all(n in RULES for n in a)  # names sharding maps
    assert axes["moe"].kv == ("cache_layers", "cache_batch", "cache_length", "cache_dim")
    assert axes["mtp"].k_pe == ("cache_batch", "cache_length", "cache_dim")
    assert axes["lengths"] == ("cache_batch",)
    assert cache_lib.axes_of(cache) == axes
    assert (axes["dense"].index_k is None) == (not cfg.has_indexer)
    if numerics == "official_fp8":
        assert cache["moe"].index_k.k8.dtype == fp8.E4M3 and cache["moe"].index_k.scale.shape[-1] == 1
    assert cache["lengths"].shape == (2,) and cache["lengths"].dtype == jnp.int32
    assert cache["dense"].kv.shape == (cfg.n_dense_layers, 2, 8, cfg.kv_lora_rank)


def test_write_drops_padding_and_out_of_range_slots():
    s = 6
    c = Latents(jnp.zeros((2, s, 3)), jnp.zeros((2, s, 2)), None)
    new = Latents(jnp.ones((2, 3, 3)), 2 * jnp.ones((2, 3, 2)), None)
    pos = jnp.array([[0, -1, 4], [s, 2, -1]])
    out = cache_lib.write(c, new, pos)
    written = np.asarray(out.kv[..., 0])
    np.testing.assert_array_equal(written, [[1, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(out.k_pe[1, 2]), [2, 2])


def test_init_cache_errors():
    with pytest.raises(ValueError, match="no MTP module"):
        cache_lib.init_cache(dsjax.Config.preset("tiny", num_nextn_predict_layers=0), 1, 8, mtp=True)
    with pytest.raises(ValueError, match="must be positive"):
        cache_lib.init_cache(dsjax.Config.preset("tiny"), 0, 8)


def test_fp8_index_keys_round_trip_exactly():
    """Keys as official_fp8 numerics produce them (FP8 values times power-of-two scales) come back from
    the FP8 cache bit for bit; the storage really is one e4m3 byte per value."""
    cfg = dsjax.Config.preset("tiny", indexer_numerics="official_fp8")
    raw = jax.random.normal(jax.random.key(0), (2, 5, cfg.index_head_dim)) * 3.0
    keys = indexer.dequantize_index_key(*indexer.quantize_index_key(indexer.hadamard(raw)), dtype=jnp.float32)
    layer = jax.tree.map(lambda x: x[0], cache_lib.init_cache(cfg, 2, 8)["moe"])
    new = Latents(jnp.ones((2, 5, cfg.kv_lora_rank)), jnp.ones((2, 5, cfg.qk_rope_head_dim)), keys)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    out = cache_lib.write(layer, new, pos)
    assert out.index_k.k8.dtype == fp8.E4M3
    back = cache_lib.read(out).index_k
    np.testing.assert_array_equal(np.asarray(back[:, :5]), np.asarray(keys))
    assert not np.asarray(back[:, 5:]).any()


def test_decode_with_fp8_index_cache_equals_full_forward():
    """Official numerics: prefill + decode from the FP8 index-key cache against one full forward. The latent
    also takes an FP8 round trip in this mode, so f32 summation-order noise between the two paths (~1e-7)
    can flip an FP8 code, and through the routing and the top-k a whole later row, as in the official code
    (whose prefill and decode differ the same way; test_official_numerics.py). So: every prefill row, and
    most decode rows, equal the forward; the cache really holds e4m3 keys."""
    cfg = dsjax.Config.preset("tiny", index_topk=16, indexer_numerics="official_fp8")
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.ones(s.shape) if s.init == "ones" else jnp.asarray(
            np.zeros(s.shape) if s.init == "zeros" else rng.normal(0, 0.1, s.shape), jnp.float32),
        params_lib.param_specs(cfg), is_leaf=lambda x: isinstance(x, params_lib.ParamSpec))
    b, length, cap, prefill = 2, 36, 48, 20  # cap and length > index_topk: decode-time DSA prunes
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, length)))
    full = dsjax.forward(params, tokens, cfg)
    step = jax.jit(lambda p, t, pos, c: model.forward_hidden(p, t, cfg, positions=pos, cache=c))
    aux = step(params, tokens[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (b, prefill)),
               cache_lib.layer_caches(cache_lib.init_cache(cfg, b, cap)))
    outs, cache = [model.lm_head(params, aux.hidden)], aux.cache
    for t in range(prefill, length):
        aux = step(params, tokens[:, t:t + 1], jnp.full((b, 1), t), cache)
        outs.append(model.lm_head(params, aux.hidden))
        cache = aux.cache
    assert cache["moe"].index_k.k8.dtype == fp8.E4M3
    got, want = np.asarray(jnp.concatenate(outs, 1)), np.asarray(full)
    np.testing.assert_allclose(got[:, :prefill], want[:, :prefill], atol=2e-5 * float(np.abs(want).max()))
    rows = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)  # [B, L]
    assert np.median(rows[:, prefill:]) <= 1e-4, np.round(rows[:, prefill:], 5)
