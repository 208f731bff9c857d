"""HF checkpoints for the checkpoint tests: BF16 copies, the official block-FP8 layout, an MTP layer.

Every HF reference here is transformers itself loading a checkpoint written by these helpers, so the
expected logits never come from dsjax code. The FP8 reference weights are dequantised with torch's own
float8_e4m3fn decoding, independently of dsjax.fp8.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from checkpoints.safetensors_io import CheckpointReader, write_file

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)

# A tiny V3.2 whose FP8-quantised matrices have ragged 128-blocks: 160 = 128 + 32, 200, 136, 72 < 128.
FP8_MODEL = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=72, q_lora_rank=136,
                 kv_lora_rank=40, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_group=4,
                 topk_group=2, num_experts_per_tok=2, index_n_heads=8)


def read_all(path: str) -> dict[str, np.ndarray]:
    r = CheckpointReader(path)
    return {k: r.read(k) for k in r.keys()}


def write_hf(path: str, tensors: dict[str, np.ndarray], config: dict, shards: int = 1) -> str:
    """config.json + safetensors (with an index when sharded)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors)
    if shards == 1:
        write_file(os.path.join(path, "model.safetensors"), tensors)
        return path
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_file(os.path.join(path, fname), {k: tensors[k] for k in names[i::shards]})
        weight_map.update({k: fname for k in names[i::shards]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def add_mtp(tensors: dict[str, np.ndarray], config: dict, seed: int = 0) -> None:
    """Give a HF checkpoint the MTP layer the official ones have at index num_hidden_layers (in place):
    a perturbed copy of the last layer, its own norms and eh_proj, and copies of the embedding and head."""
    n = config["num_hidden_layers"]
    last, d = n - 1, config["hidden_size"]
    rng = np.random.default_rng(seed)
    dt = tensors["model.norm.weight"].dtype
    for k in [k for k in tensors if k.startswith(f"model.layers.{last}.")]:
        a = tensors[k].astype(np.float32)
        tensors[k.replace(f"layers.{last}.", f"layers.{n}.")] = (
            a + 0.01 * rng.standard_normal(a.shape).astype(np.float32)).astype(tensors[k].dtype)
    tensors[f"model.layers.{n}.enorm.weight"] = np.ones(d, dt)
    tensors[f"model.layers.{n}.hnorm.weight"] = np.ones(d, dt)
    tensors[f"model.layers.{n}.eh_proj.weight"] = (0.1 * rng.standard_normal((d, 2 * d))).astype(dt)
    tensors[f"model.layers.{n}.shared_head.norm.weight"] = np.ones(d, dt)
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    config["num_nextn_predict_layers"] = 1


def bf16_checkpoint(src: str, dst: str, mtp: bool = False) -> str:
    """The fp32 HF checkpoint `src` rounded to BF16 as the official ones are stored (the router's
    correction bias stays fp32), optionally with an MTP layer; 3 shards with an index."""
    tensors = {k: a if k.endswith("e_score_correction_bias") else a.astype(BF16) for k, a in read_all(src).items()}
    cfg = dict(hf_config(src), dtype="bfloat16")
    if mtp:
        add_mtp(tensors, cfg)
    _copy_assets(src, dst)
    return write_hf(dst, tensors, cfg, shards=3)


def _copy_assets(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".json") and f not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, f), dst)


def torch_dequant(q: np.ndarray, s: np.ndarray, block: int = 128) -> np.ndarray:
    """Official block dequantisation W = fp32(q) * S[r // 128, c // 128], decoded by torch."""
    import torch

    r, c = q.shape
    qt = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(torch.float8_e4m3fn).float()
    st = torch.from_numpy(s).repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c]
    return (qt * st).numpy()


def fp8_checkpoint(src: str, dst: str, ref_dst: str, mtp: bool = False) -> tuple[str, str]:
    """The official FP8 layout of the fp32 checkpoint `src`: every quantised linear as e4m3 with its
    fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)], the rest BF16. Also writes, at `ref_dst`, the
    fp32 checkpoint of the weights that FP8 checkpoint means (torch-dequantised): the HF reference."""
    from checkpoints.hf_names import hf_table
    from dsjax import fp8
    from dsjax.config import Config

    cfg = dict(hf_config(src), dtype="bfloat16")
    tensors = read_all(src)
    if mtp:
        add_mtp(tensors, cfg)
    table = hf_table(Config.from_hf(cfg))
    out, ref = {}, {}
    for k, a in tensors.items():
        t = table[k]
        if t.quantized:
            q, s = fp8.quantize_weight(a)
            out[k], out[k + "_scale_inv"] = q, s
            ref[k] = torch_dequant(q, s)
        else:
            out[k] = a if k.endswith("e_score_correction_bias") else a.astype(BF16)
            ref[k] = out[k].astype(np.float32)
    qcfg = dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]})
    _copy_assets(src, dst)
    write_hf(dst, out, qcfg, shards=2)
    write_hf(ref_dst, ref, dict(cfg, dtype="float32"))
    return dst, ref_dst


def hf_model(path: str):
    """transformers' own model from a checkpoint directory, in fp32 with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.config._attn_implementation = "eager"
    return m.eval()
