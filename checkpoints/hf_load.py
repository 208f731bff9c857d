"""Reading a HF checkpoint (BF16/FP32 or official block-FP8) into the dsjax params tree.

`check_checkpoint` validates everything before a single tensor is read: every expected tensor is
present with the right shape and a readable dtype, FP8 tensors have their block scales, and nothing
unexpected is left over. All problems are reported at once, by key.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.hf_names import SCALE_SUFFIX, Target, block_shape, get_spec, hf_shape, hf_table, to_dsjax, transpose
from checkpoints.safetensors_io import CheckpointError, CheckpointReader
from dsjax import fp8
from dsjax.config import Config
from dsjax.params import ParamSpec, param_dtype, param_specs

log = logging.getLogger(__name__)
_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float64)}


def read_config(hf_dir: str | os.PathLike, reader: CheckpointReader, **overrides: Any) -> Config:
    """Config.from_hf, with the MTP module dropped when the checkpoint holds none of its tensors
    (HF transformers never saves it)."""
    cfg = Config.from_hf(hf_dir, **overrides)
    if cfg.num_nextn_predict_layers:
        prefix = f"model.layers.{cfg.num_hidden_layers}."
        if not any(k.startswith(prefix) for k in reader.keys()):
            log.info("checkpoint has no MTP layer (%s*); loading without it", prefix)
            cfg = cfg.replace(num_nextn_predict_layers=0)
    return cfg


def check_checkpoint(reader: CheckpointReader, config: Config) -> dict[str, tuple[Target, ParamSpec]]:
    """Validate the checkpoint against the config; returns name -> (target, spec). Raises CheckpointError."""
    specs = param_specs(config)
    table = hf_table(config)
    plan: dict[str, tuple[Target, ParamSpec]] = {}
    missing, bad_shape, bad_dtype, no_scale = [], [], [], []
    present = set(reader.keys())
    used: set[str] = set()
    for name, t in table.items():
        spec = get_spec(specs, t.path)
        if name not in present:
            missing.append(name)
            continue
        used.add(name)
        want = hf_shape(spec, t)
        got = reader.shape(name)
        if tuple(got) != tuple(want):
            bad_shape.append(f"{name}: checkpoint {list(got)}, config expects {list(want)}")
        dt = reader.dtype(name)
        if dt == np.dtype(fp8.E4M3):
            scale = name + SCALE_SUFFIX
            if not t.quantized:
                bad_dtype.append(f"{name}: FP8, but this tensor is never quantised in DeepSeek checkpoints")
            elif scale not in present:
                no_scale.append(scale)
            else:
                used.add(scale)
                blk = config.fp8_weight_block or fp8.BLOCK
                want_s = tuple(-(-d // blk) for d in want)
                if tuple(reader.shape(scale)) != want_s:
                    bad_shape.append(f"{scale}: checkpoint {list(reader.shape(scale))}, expected {list(want_s)}")
        elif dt not in _FLOATS:
            bad_dtype.append(f"{name}: dtype {dt} (expected a float type or FP8 e4m3)")
        plan[name] = (t, spec)
    unexpected = sorted(present - used - {n for n in present if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in used})
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("wrong shapes", bad_shape), ("unreadable dtypes", bad_dtype),
                         ("FP8 tensors without their weight_scale_inv", no_scale)):
        if items:
            problems.append(f"{title} ({len(items)}):\n  " + "\n  ".join(sorted(items)))
    if problems:
        raise CheckpointError(f"checkpoint {reader.dir} does not match its config "
                              f"(model_type={config.model_type}, {config.num_hidden_layers} layers):\n"
                              + "\n".join(problems))
    return plan


def read_scale(reader: CheckpointReader, name: str, config: Config, rows: tuple[int, int] | None = None
               ) -> np.ndarray:
    """fp32 `weight_scale_inv` grid of an FP8 tensor (HF orientation), or the part covering HF rows [r0, r1)."""
    blk = config.fp8_weight_block or fp8.BLOCK
    srows = None
    if rows is not None:
        if rows[0] % blk:
            raise ValueError(f"FP8 row block {rows} of {name} does not start on a {blk}-row scale block.")
        srows = (rows[0] // blk, -(-rows[1] // blk))
    return reader.read(name + SCALE_SUFFIX, srows).astype(np.float32)


def read_matrix(reader: CheckpointReader, name: str, t: Target, spec: ParamSpec, config: Config,
                dtype: np.dtype, keep_fp8: bool = False, rows: tuple[int, int] | None = None) -> Any:
    """One HF tensor as a dsjax matrix (logical shape, `dtype`), or an FP8 leaf {qweight, scale}.

    rows: only HF rows [r0, r1) (a block of a linear's outputs, or of the embedding's rows; see
    `hf_names.row_block_slices`), so that huge tensors can be streamed. FP8 blocks must start on a
    scale-block boundary. An FP8 leaf keeps each matrix 2-D as [in, out] with its transposed scale grid.
    """
    a = reader.read(name, rows)
    blk = config.fp8_weight_block or fp8.BLOCK
    if a.dtype == np.dtype(fp8.E4M3):
        s = read_scale(reader, name, config, rows)
        if keep_fp8:
            # Stored 2-D [in, out] so the transposed block grid still indexes it; see layers.weight.
            return {"qweight": transpose(a), "scale": transpose(s)}
        a = fp8.dequantize_weight_host(a, s, blk, dtype)
    if a.dtype != dtype:  # through fp32: exact for every source dtype, one rounding to `dtype`
        a = a.astype(np.float32, copy=False).astype(dtype, copy=False)
    return to_dsjax(a, t, block_shape(spec, t, rows))


def load_params(reader: CheckpointReader, config: Config) -> Any:
    """Read a whole (small) checkpoint into host numpy buffers in the params layout, then to device."""
    plan = check_checkpoint(reader, config)
    specs = param_specs(config)
    bufs = jax.tree.map(lambda s: np.zeros(s.shape, param_dtype(s, config)), specs,
                        is_leaf=lambda x: isinstance(x, ParamSpec))
    for name, (t, spec) in plan.items():
        dt = np.dtype(param_dtype(spec, config))
        m = read_matrix(reader, name, t, spec, config, dt)
        node = bufs
        for k in t.path[:-1]:
            node = node[k]
        leaf = node[t.path[-1]]
        if t.shared:
            if not np.array_equal(leaf, m):
                log.warning("%s differs from the main tensor it duplicates; using the main one", name)
            continue
        idx = tuple(i for i in (t.layer, t.expert) if i is not None)
        leaf[idx] = m
    return jax.tree.map(jnp.asarray, bufs)


def load_hf(hf_dir: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Config, Any]:
    """Read a HF directory (config.json + safetensors, single or sharded) into memory.

    For small models and tests; the 671B model goes through `python -m checkpoints.convert`.
    `dtype` is the param and compute dtype (norms, router and indexer weights stay fp32).
    Returns (config, params).
    """
    name = np.dtype(dtype).name
    reader = CheckpointReader(hf_dir)
    cfg = read_config(hf_dir, reader, dtype=name, param_dtype=name)
    return cfg, load_params(reader, cfg)
