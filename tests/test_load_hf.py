"""checkpoints.load_hf: sharded and single-file reading, MTP detection, and clear errors for bad files."""

import json
import os
import shutil

import numpy as np
import pytest

import checkpoints
from checkpoints.safetensors_io import CheckpointReader, write_file


def _tensors(path):
    r = CheckpointReader(path)
    return {k: r.read(k) for k in r.keys()}


def _copy_with(src, dst, tensors):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    write_file(os.path.join(dst, "model.safetensors"), tensors)
    return dst


def test_sharded_checkpoint_with_index(hf_v32, tmp_path):
    _, src = hf_v32
    t = _tensors(src)
    names = sorted(t)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    for fname, keys in shards.items():
        write_file(tmp_path / fname, {k: t[k] for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    cfg_a, a = checkpoints.load_hf(src)
    cfg_b, b = checkpoints.load_hf(tmp_path)
    assert cfg_a == cfg_b
    import jax
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_missing_unexpected_and_misshaped_keys_listed_together(hf_v32, tmp_path):
    _, src = hf_v32
    t = _tensors(src)
    del t["model.layers.1.self_attn.indexer.wk.weight"]
    del t["model.layers.2.mlp.experts.3.up_proj.weight"]
    t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    t["model.layers.0.self_attn.q_a_proj.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load_hf(_copy_with(src, tmp_path / "bad", t))
    msg = str(e.value)
    for needle in ("missing tensors (2)", "indexer.wk.weight", "experts.3.up_proj", "unexpected tensors (1)",
                   "mlp.extra.weight", "wrong shapes (1)", "q_a_proj.weight: checkpoint [5, 5]"):
        assert needle in msg, needle


def test_unreadable_dtype_and_truncated_file(hf_v32, tmp_path):
    _, src = hf_v32
    t = _tensors(src)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    with pytest.raises(checkpoints.CheckpointError, match="unreadable dtypes"):
        checkpoints.load_hf(_copy_with(src, tmp_path / "int", t))
    good = _copy_with(src, tmp_path / "trunc", _tensors(src))
    f = os.path.join(good, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        checkpoints.load_hf(good)
    with open(f, "wb") as fh:
        fh.write(b"\x05")
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        checkpoints.load_hf(good)
    with pytest.raises(checkpoints.CheckpointError, match="not a directory"):
        checkpoints.load_hf(tmp_path / "nope")


def test_mtp_loaded_when_present(hf_v32, tmp_path):
    """Official checkpoints carry the MTP layer at index num_hidden_layers; HF ones drop it."""
    _, src = hf_v32
    cfg0, _ = checkpoints.load_hf(src)
    assert cfg0.num_nextn_predict_layers == 0
    t = _tensors(src)
    n, last = cfg0.num_hidden_layers, cfg0.num_hidden_layers - 1
    rng = np.random.default_rng(0)
    for k in list(t):
        if k.startswith(f"model.layers.{last}."):
            t[k.replace(f"layers.{last}.", f"layers.{n}.")] = t[k] + 0.01 * rng.standard_normal(t[k].shape).astype(np.float32)
    d = cfg0.hidden_size
    t[f"model.layers.{n}.enorm.weight"] = np.ones(d, np.float32)
    t[f"model.layers.{n}.hnorm.weight"] = np.ones(d, np.float32)
    t[f"model.layers.{n}.eh_proj.weight"] = rng.standard_normal((d, 2 * d)).astype(np.float32)
    t[f"model.layers.{n}.shared_head.norm.weight"] = np.ones(d, np.float32)
    t[f"model.layers.{n}.embed_tokens.weight"] = t["model.embed_tokens.weight"]
    t[f"model.layers.{n}.shared_head.head.weight"] = t["lm_head.weight"]
    path = _copy_with(src, tmp_path / "mtp", t)
    cfg_json = json.loads(open(os.path.join(path, "config.json")).read())
    cfg_json["num_nextn_predict_layers"] = 1
    open(os.path.join(path, "config.json"), "w").write(json.dumps(cfg_json))
    cfg, params = checkpoints.load_hf(path)
    assert cfg.num_nextn_predict_layers == 1
    np.testing.assert_array_equal(params["mtp"]["eh_proj"], t[f"model.layers.{n}.eh_proj.weight"].T)
    np.testing.assert_array_equal(params["mtp"]["block"]["moe"]["router"],
                                  t[f"model.layers.{n}.mlp.gate.weight"].T)
    # the main stack is untouched by the MTP copy
    np.testing.assert_array_equal(params["moe"]["moe"]["router"][-1], t[f"model.layers.{last}.mlp.gate.weight"].T)
