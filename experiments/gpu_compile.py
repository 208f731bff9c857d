"""Compile every GPU (Pallas-Triton) kernel for real NVIDIA targets on this CPU host: sm_90 and sm_100.

    python experiments/gpu_compile.py [--targets=90,100] [--shapes=real,test] [--json=out.json]

Each public op is lowered for CUDA (`jit(f).trace(...).lower(lowering_platforms=("cuda",))`, no GPU needed);
the Triton module that Pallas emits for each `pallas_call` is captured (with its num_warps / num_stages) and
compiled by the `triton` wheel to a cubin for each target, installed apart from the environment
(`pip install --no-deps --target .triton "triton==3.6.*"`, $DSJAX_TRITON_DIR). Reported per kernel: the shared
memory a block needs (must be <= 232,448 B, what one block may opt in to on H100, H200 and B200) and the
registers and spill bytes from the bundled `ptxas -v`, and the f32 atomic adds each loop trip issues (the
elements of every `tt.atomic_rmw`: the backward's dK/dV scatter). Interpret mode sees none of this.

Shapes: "real" is V3.2 (H = 128, Dc = 512, Dr = 64, K = 2048; indexer Hi = 64, Di = 128), prefill T = 256,
backward, decode at batch 64; "test" the shapes of the interpret-mode tests.
"""

from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRITON_DIR = os.environ.get("DSJAX_TRITON_DIR", os.path.join(_REPO, ".triton"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, _REPO)

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402 - the capture point (private)

import pallas_kernels  # noqa: E402
from pallas_kernels import sparse_mla_gpu  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("targets", ["90", "100"], "CUDA compute capabilities to compile for.")
flags.DEFINE_list("shapes", ["real", "test"], "Shape sets: real (V3.2) and/or test (the numerics tests').")
flags.DEFINE_string("cases", "", "Only cases whose name contains this.")
flags.DEFINE_string("json", "", "Write the results here as JSON.")

SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on H100 / H200 / B200 (227 KiB)
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., Any]
    args: tuple[tuple[tuple[int, ...], Any], ...]


def _sparse(name, b, t, s, h, k, dc=512, dr=64, grad=False, dtype=BF16):
    args = (((b, t, h, dc), dtype), ((b, t, h, dr), dtype), ((b, s, dc), dtype), ((b, s, dr), dtype),
            ((b, t, k), I32))

    def fwd(qn, qr, kvn, kr, idx):
        return pallas_kernels.sparse_mla_with_lse(qn, qr, kvn, kr, idx, scale=0.1, backend="pallas_gpu")

    def grad_fn(qn, qr, kvn, kr, idx):
        def loss(*x):
            o, lse = fwd(*x, idx)
            return jnp.sum(o.astype(F32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)

    return Case(name, grad_fn if grad else fwd, args)


def _indexer(name, b, t, s, hi=64, di=128, topk=2048, dtype=BF16):
    def fn(q, w, k):
        return pallas_kernels.indexer_topk(q, w, k, topk=topk, q_positions=jnp.arange(s - t, s),
                                           backend="pallas_gpu")
    return Case(name, fn, (((b, t, hi, di), dtype), ((b, t, hi), F32), ((b, s, di), dtype)))


def _dense(name, b, t, s, h, dc=512, dr=64, grad=False, dtype=BF16):
    """Dense causal MLA (V3, the warm-up): the flash kernels, forward or forward + both backward kernels."""
    args = (((b, t, h, dc), dtype), ((b, t, h, dr), dtype), ((b, s, dc), dtype), ((b, s, dr), dtype))
    qpos = jnp.arange(s - t, s)

    def fwd(qn, qr, kvn, kr):
        return pallas_kernels.dense_mla_with_lse(qn, qr, kvn, kr, scale=0.1, q_positions=qpos,
                                                 backend="pallas_gpu")

    def grad_fn(qn, qr, kvn, kr):
        def loss(*x):
            o, lse = fwd(*x)
            return jnp.sum(o.astype(F32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(qn, qr, kvn, kr)

    return Case(name, grad_fn if grad else fwd, args)


def real_cases() -> list[Case]:
    return [_sparse("sparse_mla fwd B1 T256 S8K", 1, 256, 8192, 128, 2048),
            _sparse("sparse_mla grad B1 T256 S8K", 1, 256, 8192, 128, 2048, grad=True),
            _sparse("sparse_mla decode B64 S8K", 64, 1, 8192, 128, 2048),
            _indexer("indexer_topk prefill T256 S8K", 1, 256, 8192),
            _indexer("indexer_topk decode B64 S8K", 64, 1, 8192),
            _dense("dense_mla fwd B1 T4K", 1, 4096, 4096, 128),
            _dense("dense_mla grad B1 T4K", 1, 4096, 4096, 128, grad=True)]


def test_cases() -> list[Case]:
    return [_sparse("t: fwd b2 t13 h3", 2, 13, 29, 3, 21, dc=32, dr=16, dtype=F32),
            _sparse("t: grad b2 t13 h3", 2, 13, 29, 3, 21, dc=32, dr=16, grad=True, dtype=F32),
            _sparse("t: grad h1 bf16", 1, 9, 40, 1, 33, dc=64, dr=16, grad=True),
            _sparse("t: decode b4", 4, 1, 48, 4, 40, dc=32, dr=16, dtype=F32),
            _indexer("t: indexer", 2, 150, 150, hi=4, di=32, topk=48, dtype=F32),
            _dense("t: dense grad b2 t13 h3", 2, 13, 13, 3, dc=32, dr=16, grad=True, dtype=F32),
            _dense("t: dense grad t70 h3", 2, 70, 70, 3, dc=32, dr=16, grad=True, dtype=F32)]


def canary_cases() -> list[Case]:
    """What the check must reject: the backward with the forward's 64-head block (311,296 B of shared memory)."""
    def bwd64(qn, qr, kvn, kr, idx, o, lse, do, dl):
        return sparse_mla_gpu.backward(qn, qr, kvn, kr, idx, o, lse, do, dl, scale=0.1, block_h=64, block_k=16)

    b, t, s, h, k = 1, 8, 4096, 128, 2048
    return [Case("canary: bwd 64 heads", bwd64, (((b, t, h, 512), BF16), ((b, t, h, 64), BF16), ((b, s, 512), BF16),
                                                  ((b, s, 64), BF16), ((b, t, k), I32), ((b, t, h, 512), BF16),
                                                  ((b, t, h), F32), ((b, t, h, 512), BF16), ((b, t, h), F32)))]


# ----------------------------------------------------------------------------- capture + compile
def capture(case: Case) -> list[dict[str, Any]]:
    """The Triton modules (asm, name, num_warps, num_stages) of every pallas_call in the case's program."""
    mods: list[dict[str, Any]] = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def spy(jaxpr, grid_mapping, *a, **kw):
        result = original(jaxpr, grid_mapping, *a, **kw)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering: it holds the launch parameters
        asm = result.module.operation.get_asm()
        # f32 atomic adds each loop trip (per chunk of slots) issues: the elements of every tt.atomic_rmw tensor
        atomics = sum(math.prod(int(d) for d in dims.split("x"))
                      for dims in re.findall(r"tt\.atomic_rmw[^:]*:\s*\(tensor<([\dx]+)x!tt\.ptr", asm))
        mods.append({"name": str(jaxpr.debug_info.func_name), "asm": asm, "num_warps": int(caller["num_warps"]),
                     "num_stages": int(caller["num_stages"]), "atomics_per_trip": atomics,
                     "grid": [int(g) for g in result.grid]})
        return result

    triton_lowering.lower_jaxpr_to_triton_module = spy
    try:
        args = [jax.ShapeDtypeStruct(s, d) for s, d in case.args]
        jax.jit(case.fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    return mods


def _ptxas_stats(ptx: str, cc: int, bindir: str) -> dict[str, int]:
    exe = os.path.join(bindir, "ptxas-blackwell" if cc >= 100 and os.path.exists(
        os.path.join(bindir, "ptxas-blackwell")) else "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([exe, "-v", f"--gpu-name=sm_{cc}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_store_bytes": int(spill_st.group(1)) if spill_st else 0,
            "spill_load_bytes": int(spill_ld.group(1)) if spill_ld else 0}


def compile_module(mod: dict[str, Any], cc: int) -> dict[str, Any]:
    import triton  # noqa: PLC0415 - from $DSJAX_TRITON_DIR, which only this check puts on sys.path
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{mod['name']}.ttir")
        with open(path, "w") as f:
            f.write(mod["asm"])
        try:
            k = triton.compile(path, target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": mod["num_warps"], "num_stages": mod["num_stages"]})
        except Exception as e:  # noqa: BLE001 - a compile error is this check's finding
            return {"ok": False, "error": str(e).strip().splitlines()[-1][:300], "seconds": time.perf_counter() - t0}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    stats = _ptxas_stats(k.asm["ptx"], cc, bindir)
    shared = int(k.metadata.shared)
    return {"ok": shared <= SMEM_LIMIT, "shared_bytes": shared, **stats, "num_warps": mod["num_warps"],
            "num_stages": mod["num_stages"], "atomics_per_trip": mod["atomics_per_trip"], "grid": mod["grid"],
            "seconds": time.perf_counter() - t0}


def run(targets, shape_sets, only="") -> dict[str, dict[str, Any]]:
    sets = {"real": real_cases, "test": test_cases, "canary": canary_cases}
    cases = [c for s in shape_sets for c in sets[s]() if only in c.name]
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        for i, mod in enumerate(capture(case)):
            for cc in targets:
                results[f"sm_{cc} {case.name} #{i} {mod['name']}"] = compile_module(mod, int(cc))
    return results


def main(argv) -> None:
    del argv
    sys.path.insert(0, _TRITON_DIR)
    if importlib.util.find_spec("triton") is None:
        print(f"triton is not installed in {_TRITON_DIR}: run `pip install --no-deps --target .triton "
              f"\"triton==3.6.*\"` (or set DSJAX_TRITON_DIR).", file=sys.stderr)
        sys.exit(2)
    results = run(FLAGS.targets, FLAGS.shapes, FLAGS.cases)
    print(f"{'kernel':70} {'ok':3} {'smem B':>8} {'regs':>5} {'spill st/ld B':>14} {'warps':>5} {'stages':>6} "
          f"{'atomics/trip':>12} grid")
    for name, r in results.items():
        if "shared_bytes" not in r:
            print(f"{name:70} NO   {r['error']}")
            continue
        print(f"{name:70} {'ok' if r['ok'] else 'NO':3} {r['shared_bytes']:8d} {r['registers']:5d} "
              f"{r['spill_store_bytes']:6d}/{r['spill_load_bytes']:<7d} {r['num_warps']:5d} {r['num_stages']:6d} "
              f"{r['atomics_per_trip']:12d} {r['grid']}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    app.run(main)
