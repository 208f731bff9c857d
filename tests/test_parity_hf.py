"""Logit parity with HF transformers' DeepseekV32ForCausalLM / DeepseekV3ForCausalLM (fp32, tiny random
models saved with save_pretrained and read back with checkpoints.load_hf)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import dsjax
import hf_reference as H
from dsjax import indexer, rope

TOL = 1e-4  # max |Δlogits| <= TOL * max|logits|


def _check(model, params, cfg, tokens):
    ref = H.hf_logits(model, tokens)
    out = np.asarray(dsjax.forward(params, tokens, cfg))
    assert out.shape == ref.shape and out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert err <= TOL * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.fixture(scope="module")
def v32(hf_v32):
    model, path = hf_v32
    cfg, params = checkpoints.load_hf(path)
    assert cfg.model_type == "deepseek_v32" and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert np.abs(np.asarray(params["moe"]["moe"]["bias"])).min() > 0  # non-zero correction bias
    return model, cfg, params


@pytest.mark.parametrize("length", [12, 48])  # <= index_topk (dense regime) and > index_topk (top-k prunes)
def test_v32_logits(v32, length):
    model, cfg, params = v32
    tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, (2, length))
    _check(model, params, cfg, tokens)


def test_v32_topk_sets_identical_per_layer(v32):
    """Given HF's own layer inputs, the dsjax indexer selects exactly HF's top-k set for every query."""
    model, cfg, params = v32
    b, length = 2, 48
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (b, length))
    records = H.capture_indexer(model, tokens)
    assert len(records) == cfg.num_hidden_layers
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    cos, sin = rope.cos_sin(cfg, pos)
    pruned = 0
    for layer, rec in enumerate(records):
        stack, j = ("dense", layer) if layer < cfg.n_dense_layers else ("moe", layer - cfg.n_dense_layers)
        p = jax.tree.map(lambda a: a[j], params[stack])["attn"]["indexer"]
        q, w, k = indexer.project(p, jnp.asarray(rec["hidden"]), jnp.asarray(rec["q_resid"]), cos, sin, cfg)
        ours = np.asarray(indexer.select(q, w, k, config=cfg, q_positions=pos))
        for bb in range(b):
            for t in range(length):
                mine = {int(i) for i in ours[bb, t] if i >= 0}
                theirs = {int(i) for i in rec["topk"][bb, t] if i <= t}  # HF pads short rows with future keys
                assert mine == theirs, (layer, bb, t)
                pruned += len(mine) < t + 1
    assert pruned > 0.5 * cfg.num_hidden_layers * b * (length - cfg.index_topk)


def test_v3_logits(hf_v3):
    model, path = hf_v3
    cfg, params = checkpoints.load_hf(path)
    assert not cfg.has_indexer
    for length in (12, 48):
        _check(model, params, cfg, np.random.default_rng(length).integers(0, cfg.vocab_size, (2, length)))


def test_v3_without_q_lora(tmp_path):
    model = H.build_hf_model("v3", seed=3, q_lora_rank=None, first_k_dense_replace=0, num_hidden_layers=2)
    cfg, params = checkpoints.load_hf(H.save(model, str(tmp_path)))
    assert cfg.q_lora_rank is None and "dense" not in params
    _check(model, params, cfg, np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 20)))
