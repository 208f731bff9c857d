"""YaRN table and the two RoPE layouts, against the spec's numbers and HF transformers' functions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsjax import Config
from dsjax.rope import cos_sin, inv_freq, rope_halfsplit, rope_interleaved


def test_yarn_table_matches_spec_values():
    f = inv_freq(Config.preset("deepseek-v3.2"))
    assert f.dtype == np.float32 and f.shape == (32,)
    expected = {0: 1.0, 10: 0.05623413, 11: 0.03900693, 16: 0.0055, 22: 1.778279e-4, 23: 3.333804e-5,
                31: 3.333804e-6}
    for j, v in expected.items():
        assert f[j] == pytest.approx(v, rel=2e-6), j


def test_yarn_table_matches_hf_within_one_ulp():
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = DeepseekV32Config(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    hf_inv, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = inv_freq(Config.preset("deepseek-v3.2"))
    np.testing.assert_array_max_ulp(ours, hf_inv.numpy().astype(np.float32), maxulp=1)
    assert attn_factor == 1.0


def _hf_cos_sin(cfg, pos):
    c, s = cos_sin(cfg, jnp.asarray(pos))
    # HF's tables are cat(freqs, freqs) of the same fp32 angles.
    return np.concatenate([c, c], -1), np.concatenate([s, s], -1)


def test_interleaved_equals_hf_up_to_its_deinterleave_permutation():
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb_interleave

    cfg = Config.preset("deepseek-v3.2")
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 160000, (2, 5))
    x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)  # [B, T, H, 64]
    c, s = cos_sin(cfg, jnp.asarray(pos))
    ours = np.asarray(rope_interleaved(jnp.asarray(x), c, s))
    hc, hs = _hf_cos_sin(cfg, pos)
    xt = torch.as_tensor(x).transpose(1, 2)  # HF: [B, H, T, D]
    hf, _ = apply_rotary_pos_emb_interleave(xt, xt, torch.as_tensor(hc), torch.as_tensor(hs))
    perm = np.concatenate([np.arange(0, 64, 2), np.arange(1, 64, 2)])
    np.testing.assert_allclose(ours[..., perm], hf.transpose(1, 2).numpy(), rtol=0, atol=1e-6)


def test_halfsplit_equals_hf_rotate_half():
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    cfg = Config.preset("deepseek-v3.2")
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5000, (2, 7))
    x = rng.standard_normal((2, 7, 4, 64)).astype(np.float32)
    c, s = cos_sin(cfg, jnp.asarray(pos))
    ours = np.asarray(rope_halfsplit(jnp.asarray(x), c, s))
    hc, hs = _hf_cos_sin(cfg, pos)
    hf, _ = apply_rotary_pos_emb(torch.as_tensor(x), torch.as_tensor(x), torch.as_tensor(hc),
                                 torch.as_tensor(hs), unsqueeze_dim=2)
    np.testing.assert_allclose(ours, hf.numpy(), rtol=0, atol=1e-6)


def test_layouts_differ_and_preserve_norm():
    cfg = Config.preset("tiny")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 16)).astype(np.float32))
    c, s = cos_sin(cfg, jnp.arange(6)[None] * 37)
    a, b = rope_interleaved(x, c, s), rope_halfsplit(x, c, s)
    assert not np.allclose(a, b)  # the 2025-11 bug was not benign
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(b, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # position 0 is the identity
    np.testing.assert_array_equal(a[:, 0], x[:, 0])
