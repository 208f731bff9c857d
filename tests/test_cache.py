"""The KV-cache pytree: its size per token per layer against the spec's numbers, its logical axes, and
slot writes (padding dropped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import cache as cache_lib
from dsjax.attention import Latents

V32 = dsjax.Config.preset("deepseek-v3.2")
V3 = dsjax.Config.preset("deepseek-v3")


def test_bytes_per_token_match_spec():
    # Spec §4.3: latent 512 + rope key 64 values = 1152 B in bf16; §5.5/§13: bf16 index key = 256 B.
    b = cache_lib.bytes_per_token(V32)
    assert b["latent"] + b["rope_key"] == 1152
    assert b["index_key"] == 256 and b["total"] == 1408
    assert cache_lib.bytes_per_token(V3)["total"] == 1152
    assert cache_lib.bytes_per_token(V32, jnp.float32)["total"] == 2816


@pytest.mark.parametrize("cfg,per_layer", [(V32, 1408), (V3, 1152)])
def test_cache_bytes_of_the_671b_model(cfg, per_layer):
    """The allocated pytree (measured with eval_shape) is exactly layers x batch x slots x per-layer bytes,
    plus 4 bytes of length per sequence; the MTP block adds one layer."""
    b, s = 3, 40
    assert cache_lib.cache_bytes(cfg, b, s) == 61 * b * s * per_layer + 4 * b
    assert cache_lib.cache_bytes(cfg, b, s, mtp=True) == 62 * b * s * per_layer + 4 * b


@pytest.mark.parametrize("name", ["tiny", "tiny-v3"])
def test_cache_axes_cover_every_leaf(name):
    cfg = dsjax.Config.preset(name)
    cache = cache_lib.init_cache(cfg, 2, 8, mtp=True)
    axes = cache_lib.cache_axes(cfg, mtp=True)
    is_axes = lambda x: isinstance(x, tuple) and not isinstance(x, Latents)
    flat_axes, tree_axes = jax.tree.flatten(axes, is_leaf=is_axes)
    flat, tree = jax.tree.flatten(cache)
    assert tree_axes == tree
    for a, x in zip(flat_axes, flat):
        assert len(a) == x.ndim and "cache_batch" in a and all(isinstance(n, str) for n in a)
    assert axes["moe"].kv == ("layers", "cache_batch", "cache_sequence", "kv_lora")
    assert axes["mtp"].k_pe == ("cache_batch", "cache_sequence", "qk_rope")
    assert (axes["dense"].index_k is None) == (not cfg.has_indexer)
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
