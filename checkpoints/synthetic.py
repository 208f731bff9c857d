"""Synthetic HF checkpoints of any size in the official layout (BF16 or block-FP8), for tests and benchmarks.

The tensors are random bits (finite, |x| < 2) rather than a trained model: conversion cost and memory
depend only on the shapes and dtypes. Nothing is ever held in memory beyond one tensor, so a
checkpoint bigger than RAM can be written.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from checkpoints.hf_names import SCALE_SUFFIX, fp8_quantization_config, hf_shape, iter_targets
from checkpoints.safetensors_io import SafetensorsWriter
from dsjax import fp8
from dsjax.config import Config, RopeScaling

_BF16 = np.dtype(ml_dtypes.bfloat16)
_E4M3 = np.dtype(fp8.E4M3)


def wide_config(n_routed_experts: int = 128, num_hidden_layers: int = 5, **overrides) -> Config:
    """A V3.2 that is wide rather than deep: most bytes in many small experts, like the 671B model."""
    base = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                num_hidden_layers=num_hidden_layers, first_k_dense_replace=1, num_attention_heads=8,
                n_routed_experts=n_routed_experts, n_shared_experts=1, num_experts_per_tok=4, n_group=8,
                topk_group=4, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                v_head_dim=64, index_n_heads=8, index_head_dim=64, index_topk=256,
                max_position_embeddings=8192, num_nextn_predict_layers=0,
                rope_scaling=RopeScaling(factor=2.0, original_max_position_embeddings=4096))
    return Config(**{**base, **overrides})


def checkpoint_bytes(config: Config, fp8_weights: bool) -> int:
    """Size of the weights `write` produces for this config."""
    total = 0
    for _, t, spec in iter_targets(config):
        n = math.prod(hf_shape(spec, t))
        if fp8_weights and t.quantized:
            s = hf_shape(spec, t)
            total += n + 4 * math.prod(-(-d // fp8.BLOCK) for d in s)
        else:
            total += n * (4 if spec.fp32 and t.path[-1] == "bias" else 2)
    return total


class _Bits:
    """Random bits for tensors: slices of one 64 MB random pool at random offsets (fast, and as
    incompressible as fresh random data for zstd, whose window is far smaller than the pool)."""

    def __init__(self, rng: np.random.Generator, pool_bytes: int = 64 << 20):
        self.rng = rng
        self.pool = rng.integers(0, 256, pool_bytes, dtype=np.uint8)

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape) * dtype.itemsize
        reps = -(-n // self.pool.size) + 1
        start = int(self.rng.integers(0, self.pool.size))
        raw = self.pool[start:start + n] if start + n <= self.pool.size else np.tile(self.pool, reps)[start:start + n]
        if dtype == _E4M3:  # clear the top exponent bit: finite, |x| < 2
            return (raw & 0xBF).view(_E4M3).reshape(shape)
        if dtype == _BF16:
            return (raw.view(np.uint16) & 0xBFFF).view(_BF16).reshape(shape)
        return self.rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape)


def write(path: str | os.PathLike, config: Config, *, fp8_weights: bool = False, seed: int = 0,
          shard_bytes: int = 1 << 30) -> int:
    """Write config.json + sharded safetensors + index for `config` into `path`; returns the weight bytes.

    fp8_weights: quantised linears as e4m3 with fp32 `weight_scale_inv` (powers of two), the official
    layout; everything else bf16, `e_score_correction_bias` fp32.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    bits = _Bits(rng)
    entries = []
    for name, t, spec in iter_targets(config):
        shape = hf_shape(spec, t)
        if fp8_weights and t.quantized:
            entries.append((name, _E4M3, shape))
            entries.append((name + SCALE_SUFFIX, np.dtype(np.float32), tuple(-(-d // fp8.BLOCK) for d in shape)))
        else:
            entries.append((name, np.dtype(np.float32) if t.path[-1] == "bias" else _BF16, shape))
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(path, fname), shard) as w:
            for name, dt, shape in shard:
                if name.endswith(SCALE_SUFFIX):
                    a = np.exp2(rng.integers(-12, -4, math.prod(shape))).astype(np.float32).reshape(shape)
                else:
                    a = bits(shape, dt)
                w.write(name, a)
                weight_map[name] = fname
                total += a.nbytes
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = config.to_hf()
    cfg["dtype"] = "bfloat16"
    if fp8_weights:
        cfg["quantization_config"] = fp8_quantization_config(fp8.BLOCK)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return total


def quantize_params(params, config: Config):
    """The params with every matrix the official checkpoints store in FP8 (spec §7.1) block-quantised in
    memory, as {qweight [..., in, out] e4m3, scale [..., in/128, out/128]} leaves (what `load` restores from
    a `--keep_fp8` conversion): FP8 models for tests and benchmarks without writing a checkpoint."""
    layout = {t.path: ((t.layer is not None) + (t.expert is not None), t.n_in)
              for _, t, _ in iter_targets(config) if t.quantized}
    out = _copy_tree(params)
    for path, (k, n_in) in layout.items():
        node = out
        for name in path[:-1]:
            node = node[name]
        w = np.asarray(node[path[-1]], np.float32)
        rows, cols = math.prod(w.shape[k:k + n_in]), math.prod(w.shape[k + n_in:])
        qs = [fp8.quantize_weight(m) for m in w.reshape(-1, rows, cols)]
        node[path[-1]] = {"qweight": np.stack([q for q, _ in qs]).reshape(w.shape[:k] + (rows, cols)),
                          "scale": np.stack([s for _, s in qs]).reshape(w.shape[:k] + qs[0][1].shape)}
    return out


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)
