"""Per-array checksums and file manifests: a damaged checkpoint is refused by name, never loaded.

The checksum of an array is a pair of 32-bit sums of hashed words,

    s0 = sum_i mix(u_i ^ (i * G))        s1 = sum_i mix((u_i + i * H) * K)        (mod 2^32)

where u_i is the i-th 32-bit word of the array's bytes (1- and 2-byte elements widened to one word, 8-byte
ones split in two), i its flat row-major index and mix the murmur3 finaliser. Sums are exact integer
arithmetic, so the value does not depend on how the array is split: a device computes it over a sharded
global array (`device_checksums`, one jitted reduction per tree), the streamed converter over the blocks it
writes (`block_checksum`, combined with `combine`), the exporter over the blocks it reads. Hashing each word
with its index makes structured damage (a constant added to every word, a doubled tensor, swapped
blocks) as visible as random bit flips. It is a corruption check, not a cryptographic one.

A file manifest (relative path -> size) recorded at commit names the file a truncated or missing chunk
lives in before any tensorstore error can.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_MASK = (1 << 32) - 1


def _fmt(s0: int, s1: int) -> str:
    return f"{s0 & _MASK:08x}{s1 & _MASK:08x}"


def _parse(c: str) -> tuple[int, int]:
    return int(c[:8], 16), int(c[8:], 16)


def combine(parts: Iterable[str]) -> str:
    """The checksum of an array from the checksums of disjoint blocks that cover it."""
    s0 = s1 = 0
    for p in parts:
        a, b = _parse(p)
        s0, s1 = s0 + a, s1 + b
    return _fmt(s0, s1)


def _host_words(a: np.ndarray) -> np.ndarray:
    """[*a.shape, r] uint32 words of a host array (r = 2 for 8-byte dtypes, else 1)."""
    a = np.ascontiguousarray(a)
    size = a.dtype.itemsize
    if size == 8:
        return a.view(np.uint32).reshape(a.shape + (2,))
    if size not in (1, 2, 4):
        raise TypeError(f"no checksum for dtype {a.dtype}")
    return a.view(f"u{size}").astype(np.uint32, copy=False)[..., None]


_G, _H, _K = 0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D


def _mix_np(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _terms_sum(u, flat, mix, xp) -> tuple[Any, Any]:
    g, h, k = (xp.uint32(c) for c in (_G, _H, _K))
    return (xp.sum(mix(u ^ (flat * g)), dtype=xp.uint32 if xp is jnp else np.uint64),
            xp.sum(mix((u + flat * h) * k), dtype=xp.uint32 if xp is jnp else np.uint64))


def block_checksum(block: np.ndarray, index: Sequence[Any], shape: Sequence[int]) -> str:
    """Checksum contribution of `block` = array[index] of a global array of `shape` (index: ints, which
    drop their dim, and slices with step 1; missing trailing dims are whole)."""
    u = _host_words(block)
    shape = tuple(shape) + (u.shape[-1],)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index = tuple(index) + (slice(None),) * (len(shape) - 1 - len(index))
    base, dims = 0, []
    for d, ix in enumerate(index):
        if isinstance(ix, slice):
            base += (ix.start or 0) * strides[d]
            dims.append(d)
        else:
            base += int(ix) * strides[d]
    dims.append(len(shape) - 1)  # the word axis
    with np.errstate(over="ignore"):
        flat = np.full(u.shape, base & _MASK, np.uint32)
        for j, d in enumerate(dims):
            ar = np.arange(u.shape[j], dtype=np.uint32) * np.uint32(strides[d] & _MASK)
            flat += ar.reshape((-1,) + (1,) * (u.ndim - 1 - j))
        s0, s1 = _terms_sum(u, flat, _mix_np, np)
    return _fmt(int(s0), int(s1))


def host_checksum(a: np.ndarray) -> str:
    """Checksum of a whole host array."""
    return block_checksum(np.asarray(a), (), np.shape(a))


def _mix_jnp(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _device_one(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2], low word first as in host memory
    else:
        u = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
        u = u.astype(jnp.uint32)[..., None]
    flat = jnp.zeros(u.shape, jnp.uint32)
    for d in range(u.ndim):
        stride = math.prod(u.shape[d + 1:]) & _MASK
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride)
    return jnp.stack(_terms_sum(u, flat, _mix_jnp, jnp))


@jax.jit
def _device_tree(tree: Any) -> Any:
    return jax.tree.map(_device_one, tree)


def device_checksums(tree: Any) -> Any:
    """The checksum of every array leaf of `tree` (jax arrays, sharded or not, or host arrays), computed
    where the arrays live; a tree of strings of the same structure."""
    sums = jax.device_get(_device_tree(tree))
    return jax.tree.map(lambda s: _fmt(int(s[0]), int(s[1])), sums)


def by_name(tree: Any) -> dict[str, Any]:
    """{slash-joined tree path: leaf} (dict keys, attribute names and sequence indices)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)] = leaf
    return out


def mismatches(stored: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Names whose recorded checksum differs from the one computed now (names without a record: skipped)."""
    return [n for n in stored if n in actual and actual[n] != stored[n]]


def first_mismatch(stored: Mapping[str, str], named: Mapping[str, Any]) -> str | None:
    """The first name whose array (`named`: name -> array) no longer matches its recorded checksum; only the
    recorded arrays are checksummed (one jitted reduction). None when all match."""
    bad = mismatches(stored, device_checksums({n: named[n] for n in stored if n in named}))
    return bad[0] if bad else None


# --------------------------------------------------------------------------- file manifests
def manifest(root: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, int]:
    """{path relative to root: size in bytes} of every file under `root`."""
    root = os.fspath(root)
    skip = set(exclude)
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if rel not in skip:
                out[rel] = os.path.getsize(os.path.join(d, f))
    return out


def manifest_problem(root: str | os.PathLike, recorded: Mapping[str, int]) -> str | None:
    """The first recorded file that is missing or has another size, as a phrase; None if all match."""
    for rel, size in sorted(recorded.items()):
        p = os.path.join(os.fspath(root), rel)
        if not os.path.isfile(p):
            return f"its file {p} is missing"
        got = os.path.getsize(p)
        if got != size:
            return f"its file {p} is {'truncated' if got < size else 'longer than written'} ({got} of {size} bytes)"
    return None
