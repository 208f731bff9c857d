"""Backend resolution shared by every op's dispatch."""

from __future__ import annotations

import jax

BACKENDS = ("xla", "pallas_tpu", "pallas_gpu")


def resolve_backend(backend: str | None, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The concrete backend: `backend` itself, or (None) the kernel for the default device's platform
    when that op has one, else "xla"."""
    if backend is None:
        platform = jax.default_backend()
        auto = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform)
        return auto if auto in implemented else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None (auto).")
    if backend not in implemented:
        raise NotImplementedError(f"backend {backend!r} has no kernel for this op yet; use backend='xla'.")
    return backend
