"""checkpoints.convert -> checkpoints.load: HF (BF16, official block-FP8) -> Orbax -> params, against HF.

The references are transformers models loaded from the same files (BF16 upcast to fp32; for FP8 the
torch-dequantised weights), so dsjax's own loader never supplies an expected value.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_helpers as C
import checkpoints
import dsjax
import hf_reference as H
from checkpoints import convert, orbax_io
from dsjax import layers

TOL = 1e-4  # max |Δlogits| <= TOL * max|logits| (as tests/test_parity_hf.py)
LENGTHS = (12, 48)  # dense regime and top-k pruning (index_topk = 16); same shapes as test_parity_hf


def _check_logits(params, cfg, model, length, seed=0):
    tokens = np.random.default_rng(length + seed).integers(0, cfg.vocab_size, (2, length))
    ref = H.hf_logits(model, tokens)
    out = np.asarray(dsjax.forward(params, tokens, cfg))
    err = np.abs(out - ref).max()
    assert err <= TOL * np.abs(ref).max(), (err, np.abs(ref).max())
    return out


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("kind", ["v32", "v3"])
def test_bf16_convert_load_logits_match_hf(kind, hf_v32, hf_v3, tmp_path):
    _, src = hf_v32 if kind == "v32" else hf_v3
    bf16 = C.bf16_checkpoint(src, str(tmp_path / "hf"))
    model = C.hf_model(bf16)
    convert.convert(bf16, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    cfg, params = checkpoints.load(tmp_path / "ckpt")
    assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
    assert params["final_norm"].dtype == jnp.float32 and params["moe"]["moe"]["bias"].dtype == jnp.float32
    cfg, params = checkpoints.load(tmp_path / "ckpt", dtype=jnp.float32)  # exact upcast of the BF16 weights
    assert params["embed"].dtype == jnp.float32
    for length in LENGTHS:
        _check_logits(params, cfg, model, length)


def test_mtp_and_every_leaf_carried_exactly(hf_v32, tmp_path):
    """Official checkpoints hold the MTP layer at index num_hidden_layers: convert carries it into `mtp`."""
    _, src = hf_v32
    bf16 = C.bf16_checkpoint(src, str(tmp_path / "hf"), mtp=True)
    cfg = convert.convert(bf16, tmp_path / "ckpt", dtype="float32", progress=False)
    assert cfg.num_nextn_predict_layers == 1
    cfg_l, params = checkpoints.load(tmp_path / "ckpt")
    cfg_h, ref = checkpoints.load_hf(bf16, jnp.float32)
    assert cfg_l == cfg_h and "mtp" in params
    assert _tree_equal(params, ref)
    t = C.read_all(bf16)
    n = cfg.num_hidden_layers
    np.testing.assert_array_equal(np.asarray(params["mtp"]["eh_proj"]),
                                  t[f"model.layers.{n}.eh_proj.weight"].astype(np.float32).T)
    # the tokenizer / generation files travel along for export
    assert os.listdir(tmp_path / "ckpt" / orbax_io.ASSETS) == ["generation_config.json"]


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """(official-layout FP8 checkpoint with MTP, HF reference model on its dequantised weights)."""
    d = tmp_path_factory.mktemp("fp8")
    src = H.save(H.build_hf_model("v32", seed=5, **C.FP8_MODEL), str(d / "fp32"))
    fp8_dir, ref_dir = C.fp8_checkpoint(src, str(d / "fp8"), str(d / "ref"), mtp=True)
    return fp8_dir, C.hf_model(ref_dir)


def test_fp8_dequantised_and_kept_match_hf(fp8_model, tmp_path):
    fp8_dir, model = fp8_model
    convert.convert(fp8_dir, tmp_path / "deq", dtype="float32", progress=False)
    convert.convert(fp8_dir, tmp_path / "kept", dtype="float32", keep_fp8=True, progress=False)
    cfg, deq = checkpoints.load(tmp_path / "deq")
    cfg_k, kept = checkpoints.load(tmp_path / "kept")
    # Streaming big tensors in 128-row blocks (forced here with tiny blocks; ragged last blocks, scale
    # rows split along) gives the very same arrays.
    convert.convert(fp8_dir, tmp_path / "deq_rows", dtype="float32", block_bytes=32 << 10, progress=False)
    convert.convert(fp8_dir, tmp_path / "kept_rows", dtype="float32", keep_fp8=True, block_bytes=16 << 10,
                    progress=False)
    assert _tree_equal(checkpoints.load(tmp_path / "deq_rows")[1], deq)
    assert _tree_equal(checkpoints.load(tmp_path / "kept_rows")[1], kept)
    assert cfg.fp8_weight_block is None and cfg_k.fp8_weight_block == 128
    assert cfg.replace(fp8_weight_block=128) == cfg_k

    # Every quantised linear is kept as e4m3 + scales, stacked or not (the MTP block is unstacked).
    fp8_leaves = orbax_io.read_marker(tmp_path / "kept")["fp8_leaves"]
    for name in ("dense.mlp.gate", "moe.moe.experts.down", "moe.attn.wo", "moe.attn.indexer.wk",
                 "mtp.block.moe.experts.up", "mtp.block.attn.wkv_a"):
        assert name in fp8_leaves, name
    assert "moe.attn.indexer.weights_proj" not in fp8_leaves and "embed" not in fp8_leaves
    w = kept["moe"]["moe"]["experts"]["down"]
    assert w["qweight"].dtype == jnp.float8_e4m3fn and w["qweight"].shape == (1, 8, 72, 160)
    assert w["scale"].shape == (1, 8, 1, 2)

    # layers.weight dequantises each kept leaf to exactly the dequantised checkpoint's leaf.
    is_pair = lambda x: isinstance(x, dict) and "qweight" in x  # noqa: E731
    flat_k = dict(jax.tree_util.tree_flatten_with_path(kept, is_leaf=is_pair)[0])
    flat_d = dict(jax.tree_util.tree_flatten_with_path(deq)[0])
    for path, leaf in flat_k.items():
        if isinstance(leaf, dict):
            ref = flat_d[path]
            logical = ref.shape[leaf["qweight"].ndim - 2:]  # qweight is [*stacked, in, out]
            got = layers.weight(leaf, logical, jnp.float32)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=str(path))

    length = LENGTHS[-1]  # the top-k pruning regime; one length keeps this config to two compiles
    a = _check_logits(deq, cfg, model, length, seed=1)
    b = np.asarray(dsjax.forward(kept, np.random.default_rng(length + 1).integers(0, cfg.vocab_size, (2, length)),
                                 cfg_k))
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_bad_checkpoints_fail_with_every_key_listed(fp8_model, tmp_path):
    fp8_dir, _ = fp8_model
    t = C.read_all(fp8_dir)
    cfg = C.hf_config(fp8_dir)
    del t["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    del t["model.layers.0.self_attn.indexer.wk.weight"]
    t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    t["model.layers.1.self_attn.kv_b_proj.weight"] = t["model.layers.1.self_attn.kv_b_proj.weight"][:-1]
    bad = C.write_hf(str(tmp_path / "bad"), t, cfg)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "checkpoints.convert", f"--hf_dir={bad}", f"--out_dir={out}"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    # the orphaned scale of the deleted wk is unexpected too
    for needle in ("missing tensors (1)", "indexer.wk.weight\n", "unexpected tensors (2)", "mlp.extra.weight",
                   "indexer.wk.weight_scale_inv",
                   "wrong shapes (1)", "kv_b_proj.weight: checkpoint [127, 40]",
                   "without their weight_scale_inv (1)", "experts.3.up_proj.weight_scale_inv"):
        assert needle in r.stderr, (needle, r.stderr)
    assert not out.exists() and not orbax_io.partial_dir(out).exists()

    # a truncated shard is one clear error, and nothing is written
    good = C.write_hf(str(tmp_path / "trunc"), C.read_all(fp8_dir), cfg, shards=2)
    f = os.path.join(good, "model-00002-of-00002.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        convert.convert(good, out, progress=False)
    assert not out.exists() and not orbax_io.partial_dir(out).exists()


def test_load_rejects_incomplete_foreign_and_mismatched(hf_v3, tmp_path):
    _, src = hf_v3
    ckpt = tmp_path / "ckpt"
    part = orbax_io.partial_dir(ckpt)
    part.mkdir()
    (part / "notes.txt").write_text("someone else's")
    with pytest.raises(checkpoints.CheckpointError, match="not created by dsjax"):
        convert.convert(src, ckpt, progress=False)
    assert (part / "notes.txt").exists()  # never deleted
    (part / "notes.txt").unlink()
    # the leftovers of an interrupted job with other options are discarded, not resumed
    (part / "dsjax_write_state.json").write_text('{"job": "convert", "dtype": "bfloat16"}')
    (part / orbax_io.JOURNAL).write_text("embed[]\n")
    convert.convert(src, ckpt, dtype="float32", progress=False)
    assert not part.exists()
    np.testing.assert_array_equal(np.asarray(checkpoints.load(ckpt)[1]["embed"]),
                                  C.read_all(src)["model.embed_tokens.weight"])
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        convert.convert(src, ckpt, progress=False)
    convert.convert(src, ckpt, dtype="bfloat16", overwrite=True, progress=False)
    assert checkpoints.load(ckpt)[0].param_dtype == "bfloat16"

    with pytest.raises(checkpoints.CheckpointError, match="does not exist; pass a converted checkpoint"):
        checkpoints.load(tmp_path / "nothing")
    orbax_io.partial_dir(tmp_path / "half").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="write was interrupted"):
        checkpoints.load(tmp_path / "half")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="is not a dsjax model"):
        checkpoints.load(tmp_path / "foreign")

    # a marker whose config disagrees with the stored arrays: every mismatching array is named
    import json

    m = json.loads((ckpt / orbax_io.MARKER).read_text())
    m["hf_config"]["moe_intermediate_size"] += 8
    (ckpt / orbax_io.MARKER).write_text(json.dumps(m))
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(ckpt)
    msg = str(e.value)
    assert "moe.moe.experts.gate: stored [2, 16, 64, 32], config expects [2, 16, 64, 40]" in msg
    assert "moe.moe.shared.down" in msg and "dense.mlp.gate" not in msg
