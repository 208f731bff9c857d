"""checkpoints.export: Orbax -> HF safetensors that transformers loads; HF -> Orbax -> HF is bit-identical."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoint_helpers as C
import checkpoints
import hf_reference as H
from checkpoints import convert, export
from checkpoints.safetensors_io import CheckpointReader
from dsjax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_identical(a_dir, b_dir):
    a, b = CheckpointReader(a_dir), CheckpointReader(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    diff = [k for k in a.keys() if a.dtype(k) != b.dtype(k) or a.shape(k) != b.shape(k)
            or a.read(k).tobytes() != b.read(k).tobytes()]
    assert not diff, diff[:10]


@pytest.fixture(scope="module")
def bf16_mtp(hf_v32, tmp_path_factory):
    """A BF16 V3.2 checkpoint in the official layout, MTP layer included."""
    _, src = hf_v32
    return C.bf16_checkpoint(src, str(tmp_path_factory.mktemp("bf16") / "hf"), mtp=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bf16_round_trip_bit_identical(bf16_mtp, tmp_path, dtype):
    """HF -> Orbax -> HF gives every tensor back bit for bit, stored in bf16 or (exactly) in fp32."""
    # fp32: also stream the big 2-D tensors (embedding, head, MLPs) in small row blocks both ways
    block = 64 << 20 if dtype == "bfloat16" else 16 << 10
    convert.convert(bf16_mtp, tmp_path / "ckpt", dtype=dtype, block_bytes=block, progress=False)
    paths = export.export(tmp_path / "ckpt", tmp_path / "hf", max_shard_mb=1, block_bytes=block, progress=False)
    assert len(paths) > 1 and all(os.path.exists(p) for p in paths)
    _assert_identical(bf16_mtp, tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {os.path.basename(p) for p in paths}
    assert index["metadata"]["total_size"] == sum(os.path.getsize(p) for p in paths) - sum(
        8 + int.from_bytes(open(p, "rb").read(8), "little") for p in paths)
    cfg = Config.from_hf(tmp_path / "hf")
    assert cfg == Config.from_hf(bf16_mtp) and cfg.num_nextn_predict_layers == 1
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_transformers_loads_export(bf16_mtp, tmp_path):
    """from_pretrained reads the exported directory (the MTP layer's extra tensors included) and gives
    the logits of the original checkpoint; the export CLI is what produced it."""
    convert.convert(bf16_mtp, tmp_path / "ckpt", dtype="float32", progress=False)
    r = subprocess.run([sys.executable, "-m", "checkpoints.export", f"--ckpt_dir={tmp_path / 'ckpt'}",
                        f"--out_dir={tmp_path / 'hf'}", "--dtype=float32"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    tokens = np.random.default_rng(0).integers(0, 256, (2, 20))
    ref = H.hf_logits(C.hf_model(bf16_mtp), tokens)
    np.testing.assert_array_equal(H.hf_logits(C.hf_model(str(tmp_path / "hf")), tokens), ref)
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        export.export(tmp_path / "ckpt", tmp_path / "hf", progress=False)


def test_fp8_kept_round_trip_and_dequantised_export(tmp_path):
    """Official FP8 -> Orbax (--keep_fp8) -> HF (--keep_fp8) is bit-identical; without --keep_fp8 the
    export holds the torch-dequantised weights."""
    src = H.save(H.build_hf_model("v32", seed=5, **C.FP8_MODEL), str(tmp_path / "fp32"))
    fp8_dir, ref_dir = C.fp8_checkpoint(src, str(tmp_path / "fp8"), str(tmp_path / "ref"))
    convert.convert(fp8_dir, tmp_path / "ckpt", dtype="bfloat16", keep_fp8=True, block_bytes=16 << 10,
                    progress=False)
    export.export(tmp_path / "ckpt", tmp_path / "hf8", keep_fp8=True, block_bytes=16 << 10, progress=False)
    _assert_identical(fp8_dir, tmp_path / "hf8")
    qc = json.loads((tmp_path / "hf8" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]

    export.export(tmp_path / "ckpt", tmp_path / "hf", block_bytes=32 << 10, progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    got, ref = CheckpointReader(tmp_path / "hf"), CheckpointReader(ref_dir)
    assert sorted(got.keys()) == sorted(ref.keys())
    for k in ref.keys():
        # block scales are powers of two, so the dequantised weights are exact in bf16
        np.testing.assert_array_equal(got.read(k).astype(np.float32), ref.read(k), err_msg=k)


def test_save_then_export(hf_v3, tmp_path):
    """checkpoints.save (e.g. after fine-tuning) writes what load and export read."""
    _, src = hf_v3
    cfg, params = checkpoints.load_hf(src)
    checkpoints.save(tmp_path / "ckpt", params, cfg)
    cfg2, params2 = checkpoints.load(tmp_path / "ckpt")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    export.export(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    _assert_identical(src, tmp_path / "hf")
    with pytest.raises(checkpoints.CheckpointError, match="do not match"):
        checkpoints.save(tmp_path / "other", {"embed": params["embed"]}, cfg)
    with pytest.raises(checkpoints.CheckpointError, match="dtypes differ"):
        checkpoints.save(tmp_path / "other", params, cfg.replace(param_dtype="bfloat16"))
    assert not (tmp_path / "other").exists()


def test_nonfinite_weights_are_refused_at_export_and_convert(tmp_path):
    """A NaN in one weight: export names the tensor and publishes nothing; convert refuses an HF checkpoint
    holding it; --allow_nonfinite writes it anyway."""
    import dsjax

    cfg = dsjax.Config.preset("tiny")
    params = jax.tree.map(np.array, dsjax.init_params(cfg, jax.random.key(0)))  # writable host copies
    params["moe"]["attn"]["wo"][1, 0, 0, 0] = np.nan
    checkpoints.save(tmp_path / "ckpt", params, cfg)
    with pytest.raises(checkpoints.CheckpointError, match=r"model\.layers\.3\.self_attn\.o_proj\.weight holds 1 NaN"):
        export.export(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
    export.export(tmp_path / "ckpt", tmp_path / "hf", progress=False, allow_nonfinite=True)
    with pytest.raises(checkpoints.CheckpointError, match=r"o_proj\.weight holds 1 NaN/Inf values \(in the HF"):
        convert.convert(tmp_path / "hf", tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
