"""dsjax Orbax checkpoint -> HF safetensors (sharded, with an index) + config.json, streamed.

    python -m checkpoints.export --ckpt_dir=O --out_dir=H [--dtype=bfloat16|float32] [--keep_fp8]

The output is the official HF layout, which `transformers.AutoModelForCausalLM.from_pretrained(H)`,
vLLM and SGLang read: per-layer names, experts one by one (`mlp.experts.{e}.gate_proj.weight`), the
MTP layer at index num_hidden_layers (with its copies of the embedding and head), `config.json`
from `Config.to_hf()`, and the tokenizer files carried in O/hf_assets.

Each tensor is read as one slice of its stored array (tensorstore; a stacked leaf is never restored
whole) and streamed into its shard file, big 2-D tensors in row blocks, so host memory stays at one
block. By default every tensor is written back in the dtype it had in the source checkpoint (so
HF -> Orbax -> HF is bit-identical); `--dtype` sets the large matrices' dtype instead. FP8 leaves are
dequantised unless `--keep_fp8` writes them as e4m3 + `weight_scale_inv` with a quantization_config.
Like convert, the output appears at H only once complete (written in H.partial, then renamed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shutil
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from checkpoints import diskspace, integrity, model_dir, orbax_io
from checkpoints.hf_names import (SCALE_SUFFIX, fp8_quantization_config, get_spec, hf_shape, hf_table,
                                  row_block_slices, row_blocks, to_hf, transpose)
from checkpoints.restore import config_from_marker, save
from checkpoints.safetensors_io import CheckpointError, SafetensorsWriter, check_finite
from dsjax import cli, fp8
from dsjax.config import Config
from dsjax.params import param_dtype, param_specs

_OURS = ".dsjax_export_partial"  # marks H.partial as ours (safe to delete when rerunning)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor to write: name, dtype, shape and the functions producing its row blocks, in order."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: list[Callable[[], np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Arrays:
    """Stored arrays of a checkpoint, opened on first use. Every block read adds to its array's checksum,
    so `verify` checks what was exported without reading it again."""

    def __init__(self, ckpt_dir: str, block_bytes: int):
        import orbax.checkpoint as ocp

        self.dir, self._open, self._block_bytes = ckpt_dir, {}, block_bytes
        self._context = ocp.type_handlers.get_ts_context()
        self._lock = threading.Lock()
        self._sums: dict[str, list[str]] = collections.defaultdict(list)
        self._counts: collections.Counter = collections.Counter()

    def __call__(self, name: str):
        with self._lock:
            if name not in self._open:
                self._open[name] = orbax_io.open_array(self.dir, name, self._context)
            return self._open[name]

    def read(self, name: str, index: tuple[Any, ...]) -> np.ndarray:
        t = self(name)
        with orbax_io.storage_errors(f"{self.dir} (array {name})"):
            a = np.asarray(t[index].read().result())
        check = integrity.block_checksum(a, index, t.shape)
        with self._lock:
            self._sums[name].append(check)
            self._counts[name] += a.size
        return a

    def _full_checksum(self, name: str) -> str:
        """Checksum of a whole stored array, read in blocks of leading indices (~block_bytes each)."""
        t = self(name)
        shape = tuple(t.shape)
        row = math.prod(shape[1:]) * t.dtype.numpy_dtype.itemsize if shape else 1
        step = max(1, self._block_bytes // max(row, 1))
        parts = []
        with orbax_io.storage_errors(f"{self.dir} (array {name})"):
            for i in range(0, shape[0] if shape else 1, step):
                index = (slice(i, min(i + step, shape[0])),) if shape else ()
                parts.append(integrity.block_checksum(np.asarray(t[index].read().result()), index, shape))
        return integrity.combine(parts)

    def verify(self, checksums: dict[str, str]) -> None:
        """Every array read must match its recorded checksum; one CheckpointError naming the first that does
        not. Arrays read in overlapping or partial blocks are checked with one more read of their own."""
        for name, want in sorted(checksums.items()):
            if name not in self._sums:
                continue
            t = self(name)
            got = integrity.combine(self._sums[name]) if self._counts[name] == math.prod(t.shape) else None
            if got != want and self._full_checksum(name) != want:
                raise CheckpointError(f"{self.dir} is damaged: array {name} does not match the checksum written with "
                                      f"it (its data files were changed after the save); nothing was exported. "
                                      f"{orbax_io.REDO}")


def _entries(config: Config, marker: dict[str, Any], arrays: _Arrays, dtype: str | None, keep_fp8: bool,
             block_bytes: int) -> list[_Entry]:
    specs = param_specs(config)
    fp8_leaves = set(marker.get("fp8_leaves", []))
    hf_dtypes = marker.get("hf_dtypes", {})
    big = np.dtype(dtype or marker["param_dtype"])
    out: list[_Entry] = []
    for name, t in hf_table(config).items():
        spec = get_spec(specs, t.path)
        leaf = orbax_io.leaf_name(t.path)
        idx = tuple(i for i in (t.layer, t.expert) if i is not None)
        shape = hf_shape(spec, t)
        if leaf in fp8_leaves:
            out += _fp8_entries(name, leaf, idx, shape, arrays, big, keep_fp8, block_bytes)
            continue
        stored = np.dtype(param_dtype(spec, config))
        src = np.dtype(hf_dtypes.get(leaf, stored.name))
        # The narrower of source and stored dtype is lossless for a converted checkpoint and gives the
        # source tensors back bit for bit; --dtype overrides it for the large matrices.
        dt = src if src.itemsize < stored.itemsize else stored
        if dtype is not None and not spec.fp32:
            dt = big
        rows = [None]
        if len(shape) == 2 and row_block_slices(spec, t, (0, 1)) is not None:
            rows = row_blocks(shape[0], shape[1], 4, block_bytes, 1)

        def block(r, leaf=leaf, idx=idx, t=t, spec=spec, dt=dt):
            h = to_hf(arrays.read(leaf, idx + row_block_slices(spec, t, r)), t)
            return h if h.dtype == dt else h.astype(np.float32, copy=False).astype(dt)

        out.append(_Entry(name, dt, shape, [functools.partial(block, r) for r in rows]))
    return out


def _fp8_entries(name: str, leaf: str, idx: tuple[int, ...], shape: tuple[int, ...], arrays: _Arrays,
                 big: np.dtype, keep_fp8: bool, block_bytes: int) -> list[_Entry]:
    """An FP8 leaf's tensor: e4m3 + weight_scale_inv as stored, or dequantised to `big`."""
    b = fp8.BLOCK
    n_out, n_in = shape
    q, s = leaf + ".qweight", leaf + ".scale"
    full = (slice(None), slice(None))

    def cols(r):  # HF rows [r0, r1) are columns of the stored [in, out] matrix, and of its scale grid
        return full if r is None else (slice(None), slice(*r))

    def scols(r):
        return full if r is None else (slice(None), slice(r[0] // b, -(-r[1] // b)))

    def qweight(r):
        return transpose(arrays.read(q, idx + cols(r)))

    def scale():
        return transpose(arrays.read(s, idx + full))

    def dequantised(r):
        return transpose(fp8.dequantize_weight_host(arrays.read(q, idx + cols(r)), arrays.read(s, idx + scols(r)),
                                                    b, big))

    if keep_fp8:
        s_shape = (-(-n_out // b), -(-n_in // b))
        q_rows = row_blocks(n_out, n_in, 1, block_bytes, b)
        return [_Entry(name, np.dtype(fp8.E4M3), shape, [functools.partial(qweight, r) for r in q_rows]),
                _Entry(name + SCALE_SUFFIX, np.dtype(np.float32), s_shape, [scale])]
    rows = row_blocks(n_out, n_in, 4, block_bytes, b)
    return [_Entry(name, big, shape, [functools.partial(dequantised, r) for r in rows])]


def _prefetched(thunks: Iterable[Callable[[], np.ndarray]], pool: concurrent.futures.Executor, depth: int
                ) -> Iterator[np.ndarray]:
    """The thunks' results in order, computing up to `depth` ahead (tensorstore reads overlap writing)."""
    queue: collections.deque = collections.deque()
    for fn in thunks:
        queue.append(pool.submit(fn))
        if len(queue) > depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def hf_config(config: Config, dtype: np.dtype, fp8_block: int | None) -> dict[str, Any]:
    """config.json for the exported model (with the official quantization_config when FP8 is kept)."""
    d = config.to_hf()
    d["dtype"] = dtype.name
    if fp8_block:
        d["quantization_config"] = fp8_quantization_config(fp8_block)
    return d


def export(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
           keep_fp8: bool = False, max_shard_mb: int = 4096, overwrite: bool = False, block_bytes: int = 64 << 20,
           threads: int = 2, progress: bool = True, allow_nonfinite: bool = False) -> list[str]:
    """Write a dsjax model as a HF checkpoint directory; returns the safetensors paths written.

    ckpt_dir: a converted checkpoint, or a training run (its workdir, checkpoints/ or checkpoints/<step>;
    LoRA adapters merged), see `checkpoints.model_dir`. A run's params are first saved as a converted
    checkpoint next to out_dir (removed afterwards), with the run's tokenizer.
    dtype: the large matrices' dtype (default: each tensor's source dtype, as recorded at conversion).
    keep_fp8: write FP8 leaves as e4m3 + weight_scale_inv (default: dequantise them).
    block_bytes: largest block a big 2-D tensor is read and written in; threads: blocks read ahead in
    parallel (host memory ~ 2 * threads * block_bytes).
    allow_nonfinite: export tensors holding NaN / Inf (default: a CheckpointError naming the tensor; the
    unfinished output is discarded by the next export).
    """
    from tqdm.auto import tqdm

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    out = os.path.abspath(os.fspath(out_dir))
    md = model_dir.resolve(ckpt_dir)
    if md.kind == "hf":
        raise CheckpointError(f"{ckpt_dir} is already an HF checkpoint (config.json + safetensors); export takes a "
                              "converted checkpoint or a training run.")
    if md.kind == "training":
        return _export_run(md, out, dtype=dtype, keep_fp8=keep_fp8, max_shard_mb=max_shard_mb, overwrite=overwrite,
                           block_bytes=block_bytes, threads=threads, progress=progress,
                           allow_nonfinite=allow_nonfinite)
    marker = orbax_io.read_marker(ckpt_dir)
    config = config_from_marker(marker)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out_dir, delete it, or pass --overwrite.")
    part = out + orbax_io.PARTIAL
    if os.path.exists(part):
        if not os.path.exists(os.path.join(part, _OURS)):
            raise CheckpointError(f"{part} exists but was not created by checkpoints.export; move it away.")
        shutil.rmtree(part)
    os.makedirs(part)
    open(os.path.join(part, _OURS), "w").close()

    arrays = _Arrays(ckpt_dir, block_bytes)
    kept = keep_fp8 and bool(marker.get("fp8_leaves"))
    entries = _entries(config, marker, arrays, dtype, keep_fp8, block_bytes)
    diskspace.require_free(part, sum(e.nbytes for e in entries), f"exporting to {out}")
    shards = _shards(entries, max_shard_mb << 20)
    n = len(shards)
    weight_map, paths = {}, []
    bar = tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc="export", disable=not progress,
               mininterval=1.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                names = [e.name for e in shard for _ in e.blocks]
                with SafetensorsWriter(os.path.join(part, fname), [(e.name, e.dtype, e.shape) for e in shard]) as w:
                    for name, block in zip(names, _prefetched((f for e in shard for f in e.blocks), pool,
                                                              2 * threads)):
                        w.write(name, block if allow_nonfinite else check_finite(name, block, f"in {ckpt_dir}"))
                        bar.update(block.nbytes)
                weight_map.update({e.name: fname for e in shard})
                paths.append(os.path.join(out, fname))
    except CheckpointError:
        arrays.verify(marker.get("checksums", {}))  # damaged data (e.g. NaNs from flipped bits) is named as such
        raise
    finally:
        bar.close()
    arrays.verify(marker.get("checksums", {}))
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    with open(os.path.join(part, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    assets = os.path.join(ckpt_dir, orbax_io.ASSETS)
    if os.path.isdir(assets):
        for a in sorted(os.listdir(assets)):
            shutil.copy2(os.path.join(assets, a), os.path.join(part, a))
    by_dtype: dict[np.dtype, int] = {}
    for e in entries:
        by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes * (e.dtype != np.dtype(fp8.E4M3))
    main_dtype = max(by_dtype, key=by_dtype.get)
    with open(os.path.join(part, "config.json"), "w") as f:
        json.dump(hf_config(config, main_dtype, marker.get("fp8_block") if kept else None), f, indent=2)
    os.unlink(os.path.join(part, _OURS))
    orbax_io.move_into_place(part, out)
    return paths


def _export_run(md: model_dir.ModelDir, out: str, **kw) -> list[str]:
    """Export a training run's step: its params as a converted checkpoint beside `out`, then that."""
    if os.path.exists(out) and not kw["overwrite"]:
        raise CheckpointError(f"{out} already exists; choose another --out_dir, delete it, or pass --overwrite.")
    src = out + ".source"
    if os.path.exists(src):
        shutil.rmtree(src)
    config, params = model_dir.load(md.path, step=md.step)
    try:
        save(src, params, config)
        if md.tokenizer:
            os.makedirs(os.path.join(src, orbax_io.ASSETS), exist_ok=True)
            shutil.copy2(md.tokenizer, os.path.join(src, orbax_io.ASSETS, "tokenizer.json"))
        return export(src, out, **kw)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS

    paths = export(f.ckpt_dir, f.out_dir, dtype=f.dtype, keep_fp8=f.keep_fp8, max_shard_mb=f.max_shard_mb,
                   overwrite=f.overwrite, threads=f.threads, allow_nonfinite=f.allow_nonfinite)
    print(f"wrote {len(paths)} shards to {os.path.abspath(f.out_dir)}")


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("ckpt_dir", None, "dsjax model: a converted checkpoint or a training run (workdir, "
                        "checkpoints/ or checkpoints/<step>).", required=True)
    flags.DEFINE_string("out_dir", None, "Output HF checkpoint directory.", required=True)
    flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                      "dtype of the large matrices (default: each tensor's source dtype).")
    flags.DEFINE_bool("keep_fp8", False, "Write FP8 leaves as e4m3 + weight_scale_inv (official layout).")
    flags.DEFINE_integer("max_shard_mb", 4096, "Largest safetensors shard.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
    flags.DEFINE_integer("threads", 2, "Blocks read ahead in parallel.")
    flags.DEFINE_bool("allow_nonfinite", False, "Export tensors holding NaN / Inf (default: refuse them).")
    cli.run(main, "checkpoints.export")
