"""Lazy, validated safetensors reading and atomic writing (numpy; bf16 and FP8 via ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. We parse it ourselves so that FP8 tensors read as `ml_dtypes.float8_e4m3fn`, one
tensor is read at a time with `os.pread` (no whole-file mapping, so host RSS stays at one tensor), and
a truncated or corrupt file is one clear `CheckpointError`, not a crash deep inside a library.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: names the file/keys and what to do."""


def check_finite(name: str, block: np.ndarray, where: str) -> np.ndarray:
    """`block` if every value is finite; else a CheckpointError naming the tensor (convert and export refuse
    NaN / Inf weights unless asked for, so a broken model is never published as a valid checkpoint)."""
    a = np.asarray(block)
    if a.dtype.kind == "f" or a.dtype.name.startswith(("bfloat16", "float8")):
        bad = ~np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a)
        if bad.any():
            raise CheckpointError(f"{name} holds {int(bad.sum())} NaN/Inf values ({where}); fix the weights, or pass "
                                  "--allow_nonfinite to write them anyway.")
    return block


class SafetensorsFile:
    """One .safetensors file, header parsed and validated on open; tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes); re-download it.")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header "
                                          f"(header {n} bytes, file {size} bytes); re-download it.")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e}).") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON); re-download it.") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._base
        for name, meta in header.items():
            dt = meta.get("dtype")
            if dt not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dt!r}, which dsjax cannot read "
                                      f"(supported: {sorted(DTYPES)}).")
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
            if end - start != math.prod(shape) * DTYPES[dt].itemsize or end > data_size or start < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets or lies past the end "
                                      f"of the file (truncated?); re-download it.")
            self._info[name] = (DTYPES[dt], shape, start, end)

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._info[name][0]

    def nbytes(self, name: str) -> int:
        _, _, s, e = self._info[name]
        return e - s

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only rows [r0, r1) of its leading axis (one contiguous byte range)."""
        dt, shape, start, end = self._info[name]
        if rows is not None:
            r0, r1 = rows
            if not 0 <= r0 <= r1 <= shape[0]:
                raise ValueError(f"rows {rows} out of range for {name!r} with shape {list(shape)}.")
            row_bytes = math.prod(shape[1:]) * dt.itemsize
            start, end, shape = start + r0 * row_bytes, start + r1 * row_bytes, (r1 - r0,) + shape[1:]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = bytearray(end - start)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], self._base + start + got)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file reading {name!r}; re-download it.")
                got += n
        finally:
            os.close(fd)
        return np.frombuffer(buf, dtype=dt).reshape(shape)


class CheckpointReader:
    """A HF checkpoint directory: `model.safetensors.index.json` + shards, or one or more .safetensors."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"{self.dir} is not a directory; pass the folder holding config.json and "
                                  "the .safetensors files.")
        index = os.path.join(self.dir, "model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e!s}); re-download it.") from None
            missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(self.dir, v))})
            if missing:
                raise CheckpointError(f"{self.dir}: the index names shard files that are missing: {missing}.")
            for name, fname in weight_map.items():
                self._where[name] = fname
        else:
            shards = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no .safetensors files and no model.safetensors.index.json.")
            for fname in shards:
                for name in self._file(fname).keys():
                    self._where[name] = fname
        for fname in sorted(set(self._where.values())):
            f = self._file(fname)
            for name, where in self._where.items():
                if where == fname and name not in f._info:
                    raise CheckpointError(f"{self.dir}: the index places {name!r} in {fname}, which lacks it.")

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.dir, fname))
        return self._files[fname]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self._where[name]).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(self._where[name]).dtype(name)

    def nbytes(self, name: str) -> int:
        return self._file(self._where[name]).nbytes(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [r0, r1) of it), read with pread: nothing else is loaded."""
        return self._file(self._where[name]).read(name, rows)

    def files(self) -> list[str]:
        """The .safetensors files of the checkpoint (absolute paths)."""
        return [os.path.join(self.dir, f) for f in sorted(set(self._where.values()))]

    def file_of(self, name: str) -> str:
        return os.path.join(self.dir, self._where[name])


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, so only one tensor is in memory at a time.

    The header is planned up front from `entries` [(name, dtype, shape)]; `write` must then be called
    for each entry in that order, with the whole tensor or with consecutive blocks of its leading rows.
    The file appears at `path` only after `close()` (temp file in the same folder, fsync, rename); an
    exception inside the `with` block removes the temp file.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dt, shape in entries:
            dt = np.dtype(dt)
            if dt not in _NAMES:
                raise CheckpointError(f"cannot write {name!r}: dtype {dt} has no safetensors name.")
            n = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            self._order.append((name, dt, tuple(shape)))
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", prefix=".tmp-",
                                         suffix=".safetensors")
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._next, self._row = 0, 0

    def write(self, name: str, a: np.ndarray) -> None:
        """Write the next tensor, whole or as its next block of leading rows."""
        if self._next >= len(self._order):
            raise CheckpointError(f"{self.path}: all {len(self._order)} planned tensors are already written.")
        want_name, dt, shape = self._order[self._next]
        rows_left = shape[0] - self._row if shape else 1
        ok_rows = a.shape == shape if not shape else (a.ndim == len(shape) and a.shape[0] <= rows_left)
        if name != want_name or a.dtype != dt or tuple(a.shape[1:]) != shape[1:] or not ok_rows:
            raise CheckpointError(f"{self.path}: expected {want_name!r} {dt} {list(shape)} (rows from "
                                  f"{self._row}) next, got {name!r} {a.dtype} {list(a.shape)}.")
        self._f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        self._row += a.shape[0] if shape else 1
        if not shape or self._row == shape[0]:
            self._next, self._row = self._next + 1, 0

    def close(self) -> None:
        if self._next != len(self._order):
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written.")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
               ) -> None:
    """Write a .safetensors file atomically (temp file in the same folder, fsync, rename)."""
    with SafetensorsWriter(path, [(k, a.dtype, a.shape) for k, a in tensors.items()], metadata) as w:
        for k, a in tensors.items():
            w.write(k, a)


def iter_sizes(reader: CheckpointReader, names: Iterable[str]) -> int:
    """Total bytes of the named tensors."""
    return sum(reader.nbytes(n) for n in names)
