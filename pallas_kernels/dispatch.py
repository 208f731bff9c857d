"""Backend resolution shared by every op's dispatch.

`backend=None` means "the kernel of the platform the program is *lowered* for": `by_platform` traces each
platform's implementation and `lax.platform_dependent` keeps the one that matches at lowering time. So an AOT
compile for TPU from a CPU host (libtpu compile-only topologies, `experiments/plan.py`) gets the TPU kernels,
and a CPU run never lowers them. (Choosing from `jax.default_backend()` at trace time picked the CPU path for
such compiles.)
"""

from __future__ import annotations

from typing import Callable

import jax

BACKENDS = ("xla", "pallas_tpu", "pallas_gpu")


def cpu_only() -> bool:
    """Nothing but CPU can be the lowering target: the default backend is CPU and no non-CPU default device
    is set. (An AOT compile for TPU from a CPU host sets `jax.default_device(tpu_device)`, which Mosaic's
    lowering needs anyway to know the chip: experiments/tpu_compile.py and plan.py do.)"""
    dev = jax.config.jax_default_device
    return jax.default_backend() == "cpu" and (dev is None or getattr(dev, "platform", dev) == "cpu")


def by_platform(*args, default: Callable, tpu: Callable | None = None, gpu: Callable | None = None):
    """`default(*args)`, or `tpu(*args)` / `gpu(*args)` when the program is lowered for TPU / CUDA.

    When only CPU can be the target, the other branches are not traced at all (tracing a kernel costs
    compile time in every CPU program, and it would be dropped at lowering anyway)."""
    branches = {k: v for k, v in (("tpu", tpu), ("cuda", gpu)) if v is not None}
    if not branches or cpu_only():
        return default(*args)
    return jax.lax.platform_dependent(*args, default=default, **branches)


def resolve_backend(backend: str | None, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The concrete backend: `backend` itself, or (None) the kernel for the default device's platform
    when that op has one, else "xla". (The ops dispatch None with `by_platform` instead; this names what a
    run on the default device gets.)"""
    if backend is None:
        platform = jax.default_backend()
        auto = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform)
        return auto if auto in implemented else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None (auto).")
    if backend not in implemented:
        raise NotImplementedError(f"backend {backend!r} has no kernel for this op yet; use backend='xla'.")
    return backend
