"""Compile every TPU kernel path with the real compilers (Mosaic + XLA:TPU from libtpu) on this CPU host.

    python experiments/tpu_compile.py [--generations=v5e,v5p,v6e] [--shapes=real,test] [--json=out.json]

libtpu's compile-only topologies give TPU devices that compile but never run: `jit(f).trace(...).lower()
.compile()` then runs Mosaic's tiling/alignment checks and XLA:TPU's layout assignment and buffer plan, none of
which interpret mode sees. libtpu is installed apart from the main environment (the README's set-up command:
`pip install --no-deps --target .libtpu "libtpu==0.0.42.*"`, the version jax 0.10.2 pins); this script puts
that directory on sys.path ($DSJAX_LIBTPU_DIR, default <repo>/.libtpu). tests/test_tpu_compile.py runs it.

Per generation and case it reports the compiled temp memory, the post-layout HLO's relayout copies and padded
kernel outputs, XLA's cost analysis (FLOPs and HBM bytes, the kernels' own `CostEstimate`s included), the DMA
descriptors each query token issues, and the roofline time per token those imply on v5p (459 TFLOP/s bf16,
2.76 TB/s) and on the generation itself. A case fails on a compile error, on a relayout copy of a buffer of at
least a quarter of one layer's cache, on a kernel output padded more than 2x by its layout (e.g. an lse with a
trailing dim of 1 under (8, 128) tiles: 128x), or, for decode, on temp memory above 10% of one layer's cache (and 1 MiB).

"sharded" compiles the whole sharded model forward for an 8-chip v5p slice (expert and context parallelism)
and requires the TPU paths: ragged all-to-all, ragged_dot, the sparse-MLA and indexer kernels (the ops pick
their backend by the platform the program is lowered for, `pallas_kernels.dispatch.by_platform`).

Shapes: "real" is V3.2 (H = 128, Dc = 512, Dr = 64, K = 2048; indexer Hi = 64, Di = 128) at prefill
T = 256 over S = 8192 keys, backward, and decode with batch 64; "test" are the exact shapes and block sizes the
interpret-mode numerics tests run (tests/test_sparse_mla_kernels.py, tests/test_indexer_kernels.py), so the
program the tests check is one the hardware compiler accepts.
"""

from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# before jax is imported: the platform list is read at import, libtpu when the topology is first built
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
_LIBTPU_DIR = os.environ.get("DSJAX_LIBTPU_DIR", os.path.join(_REPO, ".libtpu"))
sys.path.insert(0, _LIBTPU_DIR)
sys.path.insert(0, _REPO)

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding  # noqa: E402

import dsjax  # noqa: E402
import pallas_kernels  # noqa: E402
import sharding  # noqa: E402
from pallas_kernels import dense_mla_tpu, indexer_tpu, latent_pack, sparse_mla_tpu  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("generations", ["v5e", "v5p", "v6e"], "TPU generations to compile for.")
flags.DEFINE_list("shapes", ["real", "test", "sharded", "model"],
                  "Shape sets: real (V3.2), test (the numerics tests'), sharded (the model on an 8-chip v5p "
                  "slice), model (the model's decode step over a packed cache), canary (programs the check "
                  "must reject).")
flags.DEFINE_string("cases", "", "Only cases whose name contains this.")
flags.DEFINE_string("json", "", "Write the results here as JSON.")
flags.DEFINE_bool("verbose", False, "Print compiler errors in full.")

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
PEAKS = {"v5e": (197e12, 0.82e12), "v5p": (459e12, 2.76e12), "v6e": (918e12, 1.64e12)}  # bf16 FLOP/s, HBM B/s
BF16, F32, I32, U32 = jnp.bfloat16, jnp.float32, jnp.int32, jnp.uint32
AUTO, DEFAULT = "auto", "default"
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Case:
    """One program to compile. args: (shape, dtype, layout) with layout "auto" for values that are produced
    inside the model (the compiler picks their layout) and "default" for persistent arrays (caches)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[tuple[tuple[int, ...], Any, str], ...]
    cache_bytes: int  # one layer's cache (latent or index keys)
    cache_s: int  # cache rows S: an array with an S dim and a row-width dim is cache-shaped
    cache_widths: tuple[int, ...]
    tokens: int  # query tokens per call (for per-token figures)
    dma_per_token: float  # DMA descriptors each query token issues (kernel design)
    decode: bool = False
    # outputs that the model consumes inside the step (the compiler picks their layout, as for "auto" args;
    # with XLA's default entry layouts a [.., 64]-wide gradient returned as is is copied to put 64 off the lanes)
    auto_outputs: bool = False


# ----------------------------------------------------------------------------- cases
def _sparse_case(name, b, t, s, h, k, *, dc=512, dr=64, block_k=None, grad=False, token_chunk=None):
    bk = block_k or sparse_mla_tpu.default_block_k(k)
    kp = -(-k // bk) * bk
    args = [((b, t, h, dc), BF16, AUTO), ((b, t, h, dr), BF16, AUTO), ((b, s, dc), BF16, AUTO),
            ((b, s, dr), BF16, AUTO), ((b, t, k), I32, AUTO)]
    if grad:
        fn = _public_grad if block_k is None and token_chunk is None else functools.partial(
            _pinned_grad, block_k=block_k, token_chunk=token_chunk)
        dma = 2 * kp + 2 * 2 * kp / bk  # forward + backward row gathers, 2 G writes per chunk
    else:
        fn = functools.partial(_public_fwd, block_k=block_k)
        dma = kp
    widths = (dc, dr, dc // 2, dr // 2, latent_pack.packed_width(dc, dr), latent_pack.row_words(dc, dr))
    return Case(name, fn, tuple(args), b * s * (dc + dr) * 2, s, widths, b * t, dma)


def _public_fwd(qn, qr, kvn, kr, idx, block_k=None):
    if block_k is None:
        return pallas_kernels.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.1, backend="pallas_tpu",
                                                  prefix_valid=True)
    return sparse_mla_tpu.forward(qn, qr, kvn, kr, idx, scale=0.1, block_k=block_k)


def _public_grad(qn, qr, kvn, kr, idx):
    """Through the public op's custom_vjp."""
    return jax.grad(lambda *x: _public_loss(*x, idx), argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)


def _pinned_grad(qn, qr, kvn, kr, idx, block_k, token_chunk):
    """The kernels with the block size / token chunk a test pins."""
    out, lse = sparse_mla_tpu.forward(qn, qr, kvn, kr, idx, scale=0.1, block_k=block_k)
    return sparse_mla_tpu.backward(qn, qr, kvn, kr, idx, out, lse, out, lse, scale=0.1, block_k=block_k,
                                   token_chunk=token_chunk)


def _public_loss(qn, qr, kvn, kr, idx):
    o, lse = pallas_kernels.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.1, backend="pallas_tpu",
                                                prefix_valid=True)
    return jnp.sum(o.astype(F32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))


def _decode_case(name, b, s, h, k, n_layers, *, dc=512, dr=64, block_k=None):
    w = latent_pack.row_words(dc, dr)
    bk = block_k or sparse_mla_tpu.default_block_k(k)

    def fn(qn, qr, cache, layer, idx):
        return sparse_mla_tpu.forward_packed(qn, qr, cache, layer, idx, scale=0.1, block_k=block_k,
                                             prefix_valid=True)

    args = (((b, 1, h, dc), BF16, AUTO), ((b, 1, h, dr), BF16, AUTO), ((n_layers, b, s, w), U32, DEFAULT),
            ((), I32, DEFAULT), ((b, 1, k), I32, AUTO))
    widths = (dc, dr, dc // 2, dr // 2, latent_pack.packed_width(dc, dr), w)
    return Case(name, fn, args, b * s * w * 4, s, widths, b, -(-k // bk) * bk, decode=True)


def _indexer_case(name, b, t, s, hi, di, *, topk=None, dtype=BF16, tiles=None):
    """indexer_topk through the public op (topk given), else the score kernel with the tests' tiles."""
    bs = (tiles or {}).get("block_k", 512)
    bq = min(t, (tiles or {}).get("block_q", 8))

    if topk is not None:
        def fn(q, w, k):
            pos = jnp.arange(s - t, s)
            return pallas_kernels.indexer_topk(q, w, k, topk=topk, q_positions=pos, backend="pallas_tpu")
        args = (((b, t, hi, di), dtype, AUTO), ((b, t, hi), F32, AUTO), ((b, s, di), dtype, AUTO))
    else:
        def fn(q, w, k, qp, kp, qs, ks):
            return indexer_tpu.indexer_scores_tpu(q, w, k, qp, kp, qs, ks, **(tiles or {}))
        args = (((b, t, hi, di), dtype, AUTO), ((b, t, hi), F32, AUTO), ((b, s, di), dtype, AUTO),
                ((b, t), I32, AUTO), ((b, s), I32, AUTO), ((b, t), I32, AUTO), ((b, s), I32, AUTO))
    # per query block of bq tokens: one [bs, Di] key block per needed key block (the upper bound: all)
    return Case(name, fn, args, b * s * di * 2, s, (di,), b * t, -(-s // bs) / bq + 1, decode=t == 1)


def _dense_case(name, b, t, s, h, *, dc=512, dr=64, grad=False, blocks=None):
    """Dense causal MLA (V3, the warm-up): the flash kernels through the public op, or with a test's blocks.

    The queries are the last t of s positions (t = s: causal self-attention)."""
    args = (((b, t, h, dc), BF16, AUTO), ((b, t, h, dr), BF16, AUTO), ((b, s, dc), BF16, AUTO),
            ((b, s, dr), BF16, AUTO))
    qpos = jnp.arange(s - t, s)

    def fwd(qn, qr, kvn, kr):
        if blocks is None:
            return pallas_kernels.dense_mla_with_lse(qn, qr, kvn, kr, scale=0.1, q_positions=qpos,
                                                     backend="pallas_tpu")
        return dense_mla_tpu.forward(qn, qr, kvn, kr, scale=0.1, q_positions=qpos, **blocks["fwd"])

    def grad_fn(qn, qr, kvn, kr):
        if blocks is not None:
            out, lse = fwd(qn, qr, kvn, kr)
            return dense_mla_tpu.backward(qn, qr, kvn, kr, out, lse, out, lse, scale=0.1, q_positions=qpos,
                                          **blocks["bwd"])

        def loss(*x):
            o, lse = fwd(*x)
            return jnp.sum(o.astype(F32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)

    # per query block: one key block DMA per visited block (causal self-attention: about half of them)
    bq = dense_mla_tpu.tokens_per_block(h, 256)
    return Case(name, grad_fn if grad else fwd, args, b * s * (dc + dr) * 2, s, (dc, dr), b * t,
                (-(-s // 512) / 2 + 1) / bq, auto_outputs=True)


def real_cases() -> list[Case]:
    return [
        _sparse_case("sparse_mla fwd   B1 T256 S8K", 1, 256, 8192, 128, 2048),
        _sparse_case("sparse_mla grad  B1 T256 S8K", 1, 256, 8192, 128, 2048, grad=True),
        _decode_case("sparse_mla decode B64 S8K L4", 64, 8192, 128, 2048, 4),
        _indexer_case("indexer_topk prefill T256 S8K", 1, 256, 8192, 64, 128, topk=2048),
        _indexer_case("indexer_topk decode B64 S8K", 64, 1, 8192, 64, 128, topk=2048),
        _indexer_case("indexer_scores T256 S8K", 1, 256, 8192, 64, 128),
        _dense_case("dense_mla fwd   B1 T4K", 1, 4096, 4096, 128),
        _dense_case("dense_mla grad  B1 T4K", 1, 4096, 4096, 128, grad=True),
    ]


def test_cases() -> list[Case]:
    """The numerics tests' shapes and block sizes (keep in sync with those tests)."""
    t = dict(dc=256, dr=64)
    return [
        _sparse_case("t: fwd b2 t13 h3 k21", 2, 13, 29, 3, 21, **t),
        _sparse_case("t: fwd bk16", 2, 13, 29, 3, 21, block_k=16, **t),
        _sparse_case("t: fwd h1 k33", 1, 9, 40, 1, 33, **t),
        _sparse_case("t: grad b2 t13 h3 k21", 2, 13, 29, 3, 21, grad=True, **t),
        _sparse_case("t: grad h1 k33", 1, 9, 40, 1, 33, grad=True, **t),
        _sparse_case("t: bwd bk8 chunk5", 2, 13, 29, 3, 21, grad=True, block_k=8, token_chunk=5, **t),
        _sparse_case("t: race bk8", 1, 4, 20, 2, 12, grad=True, block_k=8, token_chunk=3, **t),
        _decode_case("t: decode b5 L3 bk16", 5, 48, 8, 40, 3, block_k=16, **t),
        _sparse_case("t: model fwd", 2, 24, 24, 4, 16, grad=True, **t),
        _decode_case("t: model decode L2", 2, 32, 4, 31, 2, **t),
        _indexer_case("t: indexer small tiles", 2, 40, 300, 4, 32, dtype=F32, tiles=dict(block_q=8, block_k=128)),
        _indexer_case("t: indexer default tiles", 1, 40, 200, 4, 32, dtype=BF16),
        _indexer_case("t: indexer topk", 2, 150, 150, 4, 32, topk=48, dtype=F32),
        # tests/test_dense_mla_kernels.py: its blocks (several per axis) and the public op's defaults
        _dense_case("t: dense blocks t300 h3", 2, 300, 300, 3, dc=128, dr=64, grad=True,
                    blocks=dict(fwd=dict(block_rows=128, block_k=128),
                                bwd=dict(block_rows=128, block_k=128, dkv_block_rows=128, dkv_block_k=128))),
        _dense_case("t: dense blocks offset", 2, 150, 337, 3, dc=128, dr=64, grad=True,
                    blocks=dict(fwd=dict(block_rows=128, block_k=128),
                                bwd=dict(block_rows=128, block_k=128, dkv_block_rows=128, dkv_block_k=128))),
        _dense_case("t: dense op t13 h3", 2, 13, 13, 3, dc=128, dr=64, grad=True),
    ]


def canary_cases() -> list[Case]:
    """Programs the check must reject (tests/test_tpu_compile.py): a one-row DMA into a bf16 VMEM buffer,
    the layout the first TPU sparse-MLA kernel used, which Mosaic refuses ("aligned to tiles"); and a kernel
    reading a [S, 288] uint32 cache, which XLA:TPU stores S-minor and relayouts before the call."""

    def kernel(idx_ref, kv_hbm, o_ref, buf, sem):
        for j in range(8):
            pltpu.make_async_copy(kv_hbm.at[pl.ds(idx_ref[j], 1)], buf.at[pl.ds(j, 1)], sem.at[0]).start()
        pltpu.make_async_copy(buf, buf, sem.at[0]).wait()
        o_ref[...] = buf[...]

    def fn(idx, kv):
        return pl.pallas_call(
            kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(1,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                out_specs=pl.BlockSpec((8, 512), lambda i, idx: (0, 0)),
                scratch_shapes=[pltpu.VMEM((8, 512), BF16), pltpu.SemaphoreType.DMA((1,))]),
            out_shape=jax.ShapeDtypeStruct((8, 512), BF16))(idx, kv)

    def relayout_kernel(idx_ref, kv_hbm, o_ref, buf, sem):
        pltpu.make_async_copy(kv_hbm.at[pl.ds(idx_ref[0], 1)], buf.at[pl.ds(0, 1)], sem.at[0]).start()
        pltpu.make_async_copy(kv_hbm.at[pl.ds(0, 1)], buf.at[pl.ds(0, 1)], sem.at[0]).wait()
        o_ref[...] = buf[...]

    def relayout_fn(idx, kv):  # a [S, 288] u32 cache: XLA's default layout puts S minor, the kernel wants rows
        return pl.pallas_call(
            relayout_kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(1,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                out_specs=pl.BlockSpec((8, 288), lambda i, idx: (0, 0)),
                scratch_shapes=[pltpu.VMEM((8, 288), U32), pltpu.SemaphoreType.DMA((1,))]),
            out_shape=jax.ShapeDtypeStruct((8, 288), U32))(idx, kv)

    return [Case("canary: bf16 one-row DMA", fn, (((8,), I32, DEFAULT), ((4096, 512), BF16, DEFAULT)),
                 4096 * 1024, 4096, (512,), 8, 1),
            Case("canary: 288-wide cache relayout", relayout_fn, (((8,), I32, DEFAULT), ((4096, 288), U32, DEFAULT)),
                 4096 * 288 * 4, 4096, (288,), 8, 1)]


# ----------------------------------------------------------------------------- HLO checks
_TYPE = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]\{([^}]*)\}")
_DEF = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.+?) (\S+?)\((.*)$")


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...], str]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x), lay) for d, dims, lay in _TYPE.findall(type_str)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    n = _BYTES.get(dtype, 4)
    for d in dims:
        n *= d
    return n


def _padded_factor(dims: tuple[int, ...], layout: str) -> float:
    """Physical / logical size under the layout's first tile (e.g. T(8,128) on the two minor dims)."""
    m2m = [int(x) for x in layout.split(":")[0].split(",") if x.strip()]
    tile = re.search(r"T\(([\d,]+)\)", layout)
    if not tile or not dims or len(m2m) != len(dims):
        return 1.0
    t = [int(x) for x in tile.group(1).split(",")]
    phys = list(dims)
    for i, ts in enumerate(reversed(t)):  # the tile's last entry covers the most-minor dim
        if i < len(m2m):
            d = m2m[i]
            phys[d] = -(-phys[d] // ts) * ts
    logical = max(1, _nbytes("f32", dims))
    return _nbytes("f32", tuple(phys)) / logical


def _strip_space(layout: str) -> str:
    return re.sub(r"S\(\d+\)", "", layout)


def scan_hlo(text: str, case: Case) -> dict[str, list[str]]:
    """Relayout copies (layout changes, not memory-space moves) anywhere in the post-layout module (loop
    bodies included): "copies" of cache-shaped arrays (an S dim and a row-width dim, >= 1/8 of one layer's
    cache), "other_copies" of any other array >= 1 MiB (reported, not failed); and "padded" kernel outputs
    (> 2x their logical size, >= 64 KiB)."""
    types: dict[str, str] = {}
    copies, other, padded = [], [], []
    for line in text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, typ, op, rest = m.groups()
        types[name] = typ
        if op in ("copy", "copy-start"):
            src = re.match(r"\s*(%[\w.\-]+)", rest)
            dst_arrays = _arrays(typ)
            src_arrays = _arrays(types.get(src.group(1), "")) if src else []
            if dst_arrays and src_arrays:
                (dd, dims, dl), (_, _, sl) = dst_arrays[0], src_arrays[0]
                desc = f"{op} {dd}{list(dims)} {{{sl}}} -> {{{dl}}}"
                if _strip_space(dl) != _strip_space(sl):
                    cache_like = case.cache_s in dims and any(w in dims for w in case.cache_widths)
                    if cache_like and _nbytes(dd, dims) >= case.cache_bytes // 8:
                        copies.append(desc)
                    elif _nbytes(dd, dims) >= 1 << 20:
                        other.append(desc)
        if op == "custom-call" and "tpu_custom_call" in rest:
            for dt, dims, lay in _arrays(typ):
                if _nbytes(dt, dims) >= 1 << 16 and _padded_factor(dims, lay) > 2:
                    padded.append(f"{dt}{list(dims)}{{{lay}}} x{_padded_factor(dims, lay):.0f}")
    return {"copies": copies, "other_copies": other, "padded": padded}


# ----------------------------------------------------------------------------- compile
def compile_case(case: Case, device) -> dict[str, Any]:
    shd = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, d, sharding=shd) for s, d, _ in case.args]
    in_shardings = tuple(Format(Layout.AUTO, shd) if lay == AUTO else shd for _, _, lay in case.args)
    t0 = time.perf_counter()
    try:
        with jax.default_device(device):  # Mosaic's lowering asks the default device for the chip's tiling
            kw = dict(out_shardings=Format(Layout.AUTO, shd)) if case.auto_outputs else {}
            compiled = jax.jit(case.fn, in_shardings=in_shardings, **kw).trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 - a compiler error is this check's finding
        msg = str(e)
        return {"ok": False, "error": msg if FLAGS.verbose else msg.strip().splitlines()[0][:300],
                "seconds": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    scan = scan_hlo(compiled.as_text(), case)
    temp = int(mem.temp_size_in_bytes)
    problems = [f"relayout copy: {c}" for c in scan["copies"]] + [f"padded kernel output: {p}"
                                                                  for p in scan["padded"]]
    if case.decode and temp > max(case.cache_bytes // 10, 1 << 20):  # the floor: tiny test caches
        problems.append(f"decode temp {temp} B > 10% of one layer's cache ({case.cache_bytes} B)")
    return {"ok": not problems, "problems": problems, "notes": scan["other_copies"], "temp_bytes": temp,
            "argument_bytes": int(mem.argument_size_in_bytes), "cache_bytes": case.cache_bytes,
            "flops": float(cost.get("flops", 0.0)), "hbm_bytes": float(cost.get("bytes accessed", 0.0)),
            "tokens": case.tokens, "dma_per_token": case.dma_per_token,
            "seconds": time.perf_counter() - t0}


SHARDED_TOPOLOGY = "v5p:2x2x2"  # 8 chips
SHARDED_LAYOUTS = {"expert=4,fsdp=2": dict(expert=4, fsdp=2), "sequence=2,expert=4": dict(sequence=2, expert=4)}
# what the program must hold when the backends follow the lowering platform (an AOT TPU compile from CPU)
SHARDED_MUST_HOLD = ("ragged-all-to-all", "sparse_mla_fwd_tpu", "dsjax_indexer_scores", "ragged-dot")


def sharded_results() -> dict[str, dict[str, Any]]:
    """The whole sharded model forward (tiny MoE V3.2 widened to the kernels' dims, L = 512 > top-64) compiled
    for an 8-chip v5p slice from this CPU host: expert parallelism must use the ragged all-to-all and
    ragged_dot, attention the TPU sparse-MLA and indexer kernels (also under context parallelism)."""
    topo = topologies.get_topology_desc(SHARDED_TOPOLOGY, "tpu")
    # moe_impl names ragged_dot: "auto" picks by the default device (CPU here), see dsjax.moe.grouped_matmul
    cfg = dsjax.Config.preset("tiny", kv_lora_rank=256, qk_rope_head_dim=64, index_head_dim=64, index_topk=64,
                              moe_impl="ragged_dot")
    out = {}
    for name, sizes in SHARDED_LAYOUTS.items():
        mesh = sharding.make_mesh(devices=topo.devices, **sizes)
        par = sharding.MeshParallelism(mesh)
        params = jax.tree.map(lambda a, shd: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd),
                              dsjax.abstract_params(cfg), par.param_shardings(cfg))
        tokens = jax.ShapeDtypeStruct((2, 512), I32, sharding=NamedSharding(mesh, PartitionSpec()))
        t0 = time.perf_counter()
        with jax.default_device(topo.devices[0]):
            compiled = jax.jit(lambda p, t: sharding.forward_with_aux(p, t, cfg, par)[0]).trace(
                params, tokens).lower().compile()
        txt = compiled.as_text()
        counts = {k: txt.count(k) for k in SHARDED_MUST_HOLD}
        out[f"sharded forward {SHARDED_TOPOLOGY} {name}"] = {
            "ok": all(counts.values()), "problems": [f"no {k} in the program" for k, n in counts.items() if not n],
            "counts": counts, "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "seconds": time.perf_counter() - t0}
    return out


def model_decode_results(gen: str) -> dict[str, dict[str, Any]]:
    """The whole model's decode step (tiny V3.2 widened to the kernels' dims, bf16, 4 layers: 2 dense + 2 MoE,
    a packed 2,048-slot cache > top-64) compiled for one chip, the cache donated as `generate` does: no
    relayout copy of a cache-shaped array, temp below 10% of one layer's cache, the kernels present."""
    device = topologies.get_topology_desc(TOPOLOGIES[gen], "tpu").devices[0]
    cfg = dsjax.Config.preset("tiny", kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_topk=64,
                              dtype="bfloat16", param_dtype="bfloat16", moe_impl="ragged_dot")
    b, s = 8, 2048
    shd = SingleDeviceSharding(device)
    cache = jax.eval_shape(lambda: dsjax.cache.layer_caches(dsjax.cache.init_cache(cfg, b, s, packed=True)))
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd)
    args = (jax.tree.map(sds, dsjax.abstract_params(cfg)), jax.tree.map(sds, cache),
            jax.ShapeDtypeStruct((b, 1), I32, sharding=shd), jax.ShapeDtypeStruct((b, 1), I32, sharding=shd))

    def step(params, cache, tokens, positions):
        aux = dsjax.model.forward_hidden(params, tokens, cfg, positions=positions, cache=cache)
        return dsjax.model.lm_head(params, aux.hidden), aux.cache

    t0 = time.perf_counter()
    with jax.default_device(device):
        compiled = jax.jit(step, donate_argnums=(1,)).trace(*args).lower().compile()
    rows = cache["dense"].rows
    layer_bytes = b * s * rows.shape[-1] * 4
    widths = (rows.shape[-1], latent_pack.packed_width(512, 64), cfg.index_head_dim)
    case = Case("model decode", step, (), layer_bytes, s, widths, b, 0, decode=True)
    scan = scan_hlo(compiled.as_text(), case)
    txt = compiled.as_text()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    problems = [f"relayout copy: {c}" for c in scan["copies"]]
    problems += [f"no {k} in the program" for k in ("sparse_mla_fwd_tpu", "dsjax_indexer_scores") if k not in txt]
    # a layer's slice materialised for a custom call shows up as a dynamic-slice of a whole [B, S, .] layer
    slices = [ln.strip()[:160] for ln in txt.splitlines() if "dynamic-slice(" in ln and f",{s}," in ln]
    problems += [f"layer slice: {x}" for x in slices]
    if temp > layer_bytes // 10:
        problems.append(f"decode temp {temp} B > 10% of one layer's cache ({layer_bytes} B)")
    return {f"model decode step B{b} S{s} packed": {
        "ok": not problems, "problems": problems, "notes": scan["other_copies"], "temp_bytes": temp,
        "cache_bytes": layer_bytes, "counts": {"layer-cache copies": len(scan["copies"]), "layer slices": len(slices)},
        "seconds": time.perf_counter() - t0}}


def roofline_us(r: dict[str, Any], gen: str) -> float:
    peak, bw = PEAKS[gen]
    return max(r["flops"] / peak, r["hbm_bytes"] / bw) / max(1, r["tokens"]) * 1e6


def run(generations, shape_sets, only="") -> dict[str, dict[str, dict[str, Any]]]:
    sets = {"real": real_cases, "test": test_cases, "canary": canary_cases}
    cases = [c for s in shape_sets if s in sets for c in sets[s]()]
    cases = [c for c in cases if only in c.name]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for gen in generations:
        device = topologies.get_topology_desc(TOPOLOGIES[gen], "tpu").devices[0]
        results[gen] = {c.name: compile_case(c, device) for c in cases} if cases else {}
    if "sharded" in shape_sets:
        results.setdefault("v5p", {}).update(sharded_results())
    if "model" in shape_sets:
        for gen in generations:
            results.setdefault(gen, {}).update(model_decode_results(gen))
    return results


def print_table(results) -> None:
    print(f"{'gen':4} {'case':34} {'ok':3} {'temp MiB':>9} {'cache MiB':>9} {'GFLOP/tok':>9} {'MB/tok':>8} "
          f"{'DMA/tok':>8} {'v5p us/tok':>10} {'own us/tok':>10} {'s':>5}")
    for gen, rs in results.items():
        for name, r in rs.items():
            if "counts" in r:
                print(f"{gen:4} {name:34} {'ok' if r['ok'] else 'NO':3} {r['temp_bytes'] / 2**20:9.2f}  "
                      + ", ".join(f"{k} x{n}" for k, n in r["counts"].items()) + f"  {r['seconds']:.1f}s")
                for p in r["problems"]:
                    print(f"     ! {p}")
                continue
            if "temp_bytes" not in r:
                print(f"{gen:4} {name:34} {'NO':3}  {r['error']}")
                continue
            tok = max(1, r["tokens"])
            print(f"{gen:4} {name:34} {'ok' if r['ok'] else 'NO':3} {r['temp_bytes'] / 2**20:9.2f} "
                  f"{r['cache_bytes'] / 2**20:9.2f} {r['flops'] / tok / 1e9:9.3f} {r['hbm_bytes'] / tok / 1e6:8.2f} "
                  f"{r['dma_per_token']:8.0f} {roofline_us(r, 'v5p'):10.2f} {roofline_us(r, gen):10.2f} "
                  f"{r['seconds']:5.1f}")
            for p in r["problems"]:
                print(f"     ! {p}")
            for p in r.get("notes", []):
                print(f"     . other relayout (not a cache): {p}")


def main(argv) -> None:
    del argv
    bad = [g for g in FLAGS.generations if g not in TOPOLOGIES]
    if bad:
        raise app.UsageError(f"--generations: unknown {bad}; choose from {sorted(TOPOLOGIES)}.")
    bad = [s for s in FLAGS.shapes if s not in ("real", "test", "canary", "sharded", "model")]
    if bad:
        raise app.UsageError(f"--shapes: unknown {bad}; choose from real, test, canary, sharded, model.")
    if importlib.util.find_spec("libtpu") is None:
        print(f"libtpu is not installed in {_LIBTPU_DIR}: run `pip install --no-deps --target .libtpu "
              f"\"libtpu==0.0.42.*\"` (or set DSJAX_LIBTPU_DIR).", file=sys.stderr)
        sys.exit(2)
    results = run(FLAGS.generations, FLAGS.shapes, FLAGS.cases)
    print_table(results)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if all(r["ok"] for rs in results.values() for r in rs.values()) else 1)


if __name__ == "__main__":
    app.run(main)
