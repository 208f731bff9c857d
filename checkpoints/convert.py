"""HF safetensors (BF16 / FP32, or the official block-FP8) -> dsjax Orbax checkpoint, streamed.

    python -m checkpoints.convert --hf_dir=D --out_dir=O [--dtype=bfloat16|float32] [--keep_fp8]

The checkpoint is validated completely first (`hf_load.check_checkpoint`: every missing, unexpected or
mis-shaped tensor at once). Then every HF tensor becomes one block of its params leaf (`hf_names`
table): layer i of a scanned stack is index i of the stacked array, expert e of MoE layer i is index
(i, e). Huge 2-D tensors (embedding, head, big dense MLPs) are further split into row blocks. Host
memory therefore holds at most `--inflight_mb` of blocks plus the ones being read, never the model.

FP8 weights are dequantised per 128x128 block (ragged edge blocks included) into `--dtype`, or with
`--keep_fp8` stored as they are: leaf {"qweight": e4m3 [..., in, out], "scale": f32 [..., in/128,
out/128]} that `dsjax.layers.weight` dequantises on the fly (the 671B model in ~700 GB, not 1.3 TB).

The write is atomic and resumable (see `orbax_io`): until it completes, only `O.partial` exists; rerun
the same command after a crash and it continues from the last committed block.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from checkpoints import orbax_io
from checkpoints.hf_load import check_checkpoint, read_config, read_matrix, read_scale
from checkpoints.hf_names import (SCALE_SUFFIX, Target, block_shape, get_spec, hf_shape, leaf_paths,
                                  matrix_shape, row_block_slices, row_blocks, transpose)
from checkpoints.safetensors_io import CheckpointError, CheckpointReader, check_finite
from dsjax import cli, fp8
from dsjax.config import Config
from dsjax.params import ParamSpec, param_dtype, param_specs

_E4M3 = np.dtype(fp8.E4M3)
_NOT_ASSETS = ("model.safetensors.index.json", "config.json")
_MAX_ASSET_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One params leaf and the HF tensors that fill it."""

    path: tuple[str, ...]
    spec: ParamSpec
    entries: list[tuple[str, Target]]


def _stack_index(t: Target) -> tuple[int, ...]:
    """Index of a target's matrix in its stacked leaf: (layer,), (layer, expert) or ()."""
    return tuple(i for i in (t.layer, t.expert) if i is not None)


def _block_key(name: str, idx: tuple[int, ...], rows: tuple[int, int] | None) -> str:
    """Journal key of a block, e.g. "moe.moe.experts.gate[3,17]" or "lm_head[][0:4096]" (no spaces)."""
    return f"{name}[{','.join(map(str, idx))}]" + ("" if rows is None else f"[{rows[0]}:{rows[1]}]")


def _mem_per_elem(src: np.dtype, dst: np.dtype, dequantise: bool) -> int:
    """Peak host bytes per element while producing and writing a block (read, fp32 temps, output, copy)."""
    if dequantise:
        return 1 + 4 + 4 + 2 * dst.itemsize
    return src.itemsize + (4 if src != dst else 0) + 2 * dst.itemsize


def _plain_leaf(reader: CheckpointReader, leaf: _Leaf, config: Config, dtype: np.dtype, block_bytes: int,
                check: Callable[[str, np.ndarray], np.ndarray]) -> orbax_io.StreamedArray:
    """A leaf in its logical shape and `dtype` (FP8 sources dequantised); `check` vets each block."""
    spec = leaf.spec
    t0 = leaf.entries[0][1]
    m = matrix_shape(spec, t0)
    nstack = len(spec.shape) - len(m)
    src = np.dtype(reader.dtype(leaf.entries[0][0]))
    per = _mem_per_elem(src, dtype, src == _E4M3)
    hs = hf_shape(spec, t0)
    blocks_rows: list[tuple[int, int] | None] = [None]
    if len(hs) == 2 and row_block_slices(spec, t0, (0, 1)) is not None:
        blocks_rows = row_blocks(hs[0], hs[1], per, block_bytes, config.fp8_weight_block or fp8.BLOCK)
    write_shape = (1,) * nstack + block_shape(spec, t0, blocks_rows[0])
    name = orbax_io.leaf_name(leaf.path)
    blocks = []
    for hf_name, t in leaf.entries:
        idx = _stack_index(t)
        for rows in blocks_rows:
            out = block_shape(spec, t, rows)
            blocks.append(orbax_io.Block(
                key=_block_key(name, idx, rows),
                index=idx + row_block_slices(spec, t, rows),
                produce=lambda n=hf_name, t=t, r=rows: check(n, read_matrix(reader, n, t, spec, config, dtype, rows=r)),
                out_bytes=math.prod(out) * dtype.itemsize))
    return orbax_io.StreamedArray(spec.shape, dtype, write_shape, blocks)


def _fp8_leaf(reader: CheckpointReader, leaf: _Leaf, config: Config, block_bytes: int,
              check: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """A leaf kept in FP8: {"qweight": e4m3 [*stack, in, out], "scale": f32 [*stack, in/b, out/b]}."""
    spec = leaf.spec
    t0 = leaf.entries[0][1]
    blk = config.fp8_weight_block or fp8.BLOCK
    m = matrix_shape(spec, t0)
    stack = spec.shape[: len(spec.shape) - len(m)]
    n_out, n_in = hf_shape(spec, t0)  # HF [out, in]
    rows_list = row_blocks(n_out, n_in, 1 + 4, block_bytes, blk)
    rb = n_out if rows_list[0] is None else rows_list[0][1]
    sb = lambda r: (slice(None), slice(None)) if r is None else (slice(None), slice(r[0] // blk, -(-r[1] // blk)))
    qb = lambda r: (slice(None), slice(None)) if r is None else (slice(None), slice(*r))
    name = orbax_io.leaf_name(leaf.path)
    q_blocks, s_blocks = [], []
    for hf_name, t in leaf.entries:
        idx = _stack_index(t)
        for rows in rows_list:
            nr = n_out if rows is None else rows[1] - rows[0]
            q_blocks.append(orbax_io.Block(
                key=_block_key(name + ".qweight", idx, rows), index=idx + qb(rows),
                produce=lambda n=hf_name, r=rows: check(n, transpose(reader.read(n, r))),
                out_bytes=nr * n_in))
            ns = -(-n_in // blk) * -(-nr // blk)
            s_blocks.append(orbax_io.Block(
                key=_block_key(name + ".scale", idx, rows), index=idx + sb(rows),
                produce=lambda n=hf_name, r=rows: check(n + SCALE_SUFFIX, transpose(read_scale(reader, n, config, r))),
                out_bytes=4 * ns))
    one = (1,) * len(stack)
    return {
        "qweight": orbax_io.StreamedArray(stack + (n_in, n_out), _E4M3, one + (n_in, rb), q_blocks),
        "scale": orbax_io.StreamedArray(stack + (-(-n_in // blk), -(-n_out // blk)), np.dtype(np.float32),
                                        one + (-(-n_in // blk), -(-rb // blk)), s_blocks),
    }


def _same_tensor(reader: CheckpointReader, a: str, b: str, block_bytes: int) -> bool:
    """Whether two HF tensors hold the same values, compared in row blocks (never whole in memory)."""
    if reader.shape(a) != reader.shape(b) or reader.dtype(a) != reader.dtype(b):
        return False
    shape = reader.shape(a)
    rows = row_blocks(shape[0], math.prod(shape[1:]), 2 * reader.dtype(a).itemsize, block_bytes, 1)
    return all(np.array_equal(reader.read(a, r), reader.read(b, r)) for r in rows)


def plan(reader: CheckpointReader, config: Config, *, keep_fp8: bool = False, block_bytes: int = 64 << 20,
         allow_nonfinite: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree of StreamedArray, marker fields) converting `reader` into the params layout of `config`.

    Validates the checkpoint first (CheckpointError listing every bad key); each block read is refused when it
    holds NaN / Inf (unless allow_nonfinite).
    """
    check = (lambda n, a: a) if allow_nonfinite else (lambda n, a: check_finite(n, a, "in the HF checkpoint"))
    checked = check_checkpoint(reader, config)
    specs = param_specs(config)
    by_path: dict[tuple[str, ...], list[tuple[str, Target]]] = {}
    for hf_name, (t, _) in checked.items():
        if t.shared:
            main = next(n for n, (u, _) in checked.items() if u.path == t.path and not u.shared)
            if not _same_tensor(reader, hf_name, main, block_bytes):
                # As load_hf: the MTP layer's copy of the embedding / head is never stored twice.
                orbax_io.log.warning("%s differs from %s, which it duplicates; keeping %s", hf_name, main, main)
            continue
        by_path.setdefault(t.path, []).append((hf_name, t))
    tree: dict[str, Any] = {}
    fp8_leaves, hf_dtypes = [], {}
    blk = config.fp8_weight_block or fp8.BLOCK
    for path in leaf_paths(config):
        leaf = _Leaf(path, get_spec(specs, path), by_path[path])
        srcs = {np.dtype(reader.dtype(n)) for n, _ in leaf.entries}
        dt = np.dtype(param_dtype(leaf.spec, config))
        name = orbax_io.leaf_name(path)
        if keep_fp8 and srcs == {_E4M3}:
            if blk != fp8.BLOCK:
                raise CheckpointError(f"--keep_fp8 needs {fp8.BLOCK}x{fp8.BLOCK} scale blocks (what "
                                      f"dsjax.layers.weight dequantises); this checkpoint uses {blk}. "
                                      "Convert without --keep_fp8.")
            value: Any = _fp8_leaf(reader, leaf, config, block_bytes, check)
            fp8_leaves.append(name)
            hf_dtypes[name] = _E4M3.name
        else:
            if keep_fp8 and _E4M3 in srcs:
                orbax_io.log.warning("%s mixes FP8 and other dtypes across layers; dequantising it", name)
            value = _plain_leaf(reader, leaf, config, dt, block_bytes, check)
            # export writes a tensor back in its source dtype (dequantised FP8: the converted dtype)
            hf_dtypes[name] = dt.name if _E4M3 in srcs else max(srcs, key=lambda d: d.itemsize).name
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    marker = {"format": orbax_io.FORMAT, "hf_config": config.to_hf(), "param_dtype": config.param_dtype,
              "fp8_leaves": fp8_leaves, "fp8_block": blk if fp8_leaves else None, "hf_dtypes": hf_dtypes}
    return tree, marker


def _assets(hf_dir: str) -> list[str]:
    """Tokenizer, generation config and other small non-weight files to carry along."""
    out = []
    for f in sorted(os.listdir(hf_dir)):
        p = os.path.join(hf_dir, f)
        if (os.path.isfile(p) and not f.startswith(".") and not f.endswith(".safetensors")
                and f not in _NOT_ASSETS and os.path.getsize(p) <= _MAX_ASSET_BYTES):
            out.append(p)
    return out


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = "bfloat16", keep_fp8: bool = False,
            overwrite: bool = False, threads: int = 2, inflight_mb: int = 512, chunk_mb: int = 8,
            compress: bool = True, block_bytes: int | None = None, progress: bool = True,
            allow_nonfinite: bool = False) -> Config:
    """Convert a HF DeepSeek V3 / V3.2 checkpoint directory into a dsjax Orbax checkpoint at `out_dir`.

    dtype: storage dtype of the large matrices (norms, router, bias and indexer weights stay fp32).
    keep_fp8: keep official FP8 weights (and their scales) instead of dequantising them.
    overwrite: replace an existing `out_dir` once the new checkpoint is complete.
    threads / inflight_mb / chunk_mb: reader threads, in-flight memory budget, zarr chunk target size.
    compress: zstd-compress the chunks (Orbax's default; ~3x slower writes on few cores, ~10% smaller).
    block_bytes: largest block a big 2-D tensor is read in (default inflight/4).
    allow_nonfinite: write tensors holding NaN / Inf (default: a CheckpointError naming the tensor).
    Returns the model Config. Raises CheckpointError (one message listing every problem) on bad input.
    """
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    name = np.dtype(dtype).name
    if name not in ("bfloat16", "float32"):
        raise CheckpointError(f"dtype={name}: convert stores bfloat16 or float32.")
    reader = CheckpointReader(hf_dir)
    try:
        config = read_config(hf_dir, reader, dtype=name, param_dtype=name)
    except ValueError as e:
        raise CheckpointError(f"{hf_dir}/config.json: {e}") from None
    inflight = inflight_mb << 20
    block_bytes = block_bytes or max(1 << 20, inflight // 4)
    tree, marker = plan(reader, config, keep_fp8=keep_fp8, block_bytes=block_bytes, allow_nonfinite=allow_nonfinite)
    if keep_fp8 and not marker["fp8_leaves"]:
        orbax_io.log.warning("--keep_fp8: %s holds no FP8 weights; nothing to keep", hf_dir)
    marker = dict(marker, source=hf_dir, written_by="checkpoints.convert")
    files = {os.path.basename(f): [os.path.getsize(f), os.stat(f).st_mtime_ns] for f in reader.files()}
    state = {"job": "convert", "format": orbax_io.FORMAT, "hf_dir": hf_dir, "files": files, "dtype": name,
             "keep_fp8": bool(keep_fp8), "block_bytes": block_bytes, "chunk_bytes": chunk_mb << 20,
             "compress": bool(compress)}
    orbax_io.write_streamed(out_dir, tree, marker, state=state, assets=_assets(hf_dir), overwrite=overwrite,
                            threads=threads, inflight_bytes=inflight, chunk_bytes=chunk_mb << 20,
                            compress=compress, progress=progress)
    return config


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS

    convert(f.hf_dir, f.out_dir, dtype=f.dtype, keep_fp8=f.keep_fp8, overwrite=f.overwrite, threads=f.threads,
            inflight_mb=f.inflight_mb, chunk_mb=f.chunk_mb, compress=f.compress,
            allow_nonfinite=f.allow_nonfinite)
    print(f"wrote {os.path.abspath(f.out_dir)}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + *.safetensors).", required=True)
    flags.DEFINE_string("out_dir", None, "Output dsjax (Orbax) checkpoint directory.", required=True)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the large matrices.")
    flags.DEFINE_bool("keep_fp8", False, "Keep official FP8 weights and their block scales.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir once the new checkpoint is complete.")
    flags.DEFINE_integer("threads", 2, "Reader threads.")
    flags.DEFINE_integer("inflight_mb", 512, "Host memory budget for blocks being read or written.")
    flags.DEFINE_bool("compress", True, "zstd-compress chunks (Orbax's default).")
    flags.DEFINE_integer("chunk_mb", 8, "Target zarr chunk size (smaller: sharded restores read less).")
    flags.DEFINE_bool("allow_nonfinite", False, "Convert tensors holding NaN / Inf (default: refuse them).")


if __name__ == "__main__":
    _define_flags()
    cli.run(main, "checkpoints.convert")
