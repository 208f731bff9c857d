"""Dispatch of the sparse MLA attention ops (DSA's gather; the dense causal op is `dense_mla`).

`sparse_mla` / `sparse_mla_with_lse` run one of three implementations of the same op:
  * "pallas_tpu": `sparse_mla_tpu` (Mosaic: one token x all heads per grid step, one DMA per selected
    row of the packed latent cache `latent_pack`; bf16 compute with f32 accumulation);
  * "pallas_gpu": `sparse_mla_gpu` (Triton: heads as the matmul M dimension, pointer gathers; split-K
    over the top-k list when the grid is small, e.g. decode with T = 1);
  * "xla": `reference.sparse_mla_with_lse` (the CPU path and the oracle: a loop over query-row blocks that
    gathers each query's K rows, or, while S <= 2·K, attends densely with each block's top-k mask, where
    XLA:CPU's dense matmuls are as fast as the gathered ones; the same attention either way).
The kernels are differentiable through one `custom_vjp`: the forward kernel saves (out, lse), the backward
kernel recomputes P from lse, owns dQ per program, and scatter-adds dK/dV (atomics on GPU, an XLA
scatter-add of staged rows on TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import latent_pack, reference, sparse_mla_gpu, sparse_mla_tpu
from pallas_kernels.dispatch import by_platform, resolve_backend

IMPLEMENTED = ("xla", "pallas_tpu", "pallas_gpu")
_KERNELS = {"pallas_tpu": sparse_mla_tpu, "pallas_gpu": sparse_mla_gpu}


def _check_shapes(q_nope, q_rope, kv_nope, k_rope, indices) -> None:
    """One clear error for inconsistent inputs (shapes are static, so this costs nothing under jit)."""
    problems = []
    if q_nope.ndim != 4 or q_rope.ndim != 4 or kv_nope.ndim != 3 or k_rope.ndim != 3 or indices.ndim != 3:
        problems.append("expected ranks q_nope 4, q_rope 4, kv_nope 3, k_rope 3, indices 3")
    else:
        b, t, h, dc = q_nope.shape
        s = kv_nope.shape[1]
        dr = q_rope.shape[-1]
        want = {"q_rope": (q_rope.shape, (b, t, h, dr)), "kv_nope": (kv_nope.shape, (b, s, dc)),
                "k_rope": (k_rope.shape, (b, s, dr)), "indices": (indices.shape[:2], (b, t))}
        problems += [f"{n} has shape {got}, expected {exp}" for n, (got, exp) in want.items() if got != exp]
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        problems.append(f"indices must be an integer array, got {indices.dtype}")
    if problems:
        raise ValueError(
            "sparse_mla: " + "; ".join(problems) + ". Shapes: q_nope [B, T, H, Dc], q_rope [B, T, H, Dr], "
            f"kv_nope [B, S, Dc], k_rope [B, S, Dr], indices int [B, T, K]; got q_nope {q_nope.shape}, "
            f"q_rope {q_rope.shape}, kv_nope {kv_nope.shape}, k_rope {k_rope.shape}, indices {indices.shape}.")


def _kernel_kw(backend, interpret, prefix_valid):
    kw = dict(interpret=interpret)
    if backend == "pallas_tpu":  # the TPU kernel finds a row's valid slots by bisection when they come first
        kw["prefix_valid"] = prefix_valid
    return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _kernel_sparse_mla(qn, qr, kvn, kr, idx, scale, backend, interpret, prefix_valid):
    return _KERNELS[backend].forward(qn, qr, kvn, kr, idx, scale=scale,
                                     **_kernel_kw(backend, interpret, prefix_valid))


def _kernel_fwd(qn, qr, kvn, kr, idx, scale, backend, interpret, prefix_valid):
    out, lse = _kernel_sparse_mla(qn, qr, kvn, kr, idx, scale, backend, interpret, prefix_valid)
    return (out, lse), (qn, qr, kvn, kr, idx, out, lse)


def _kernel_bwd(scale, backend, interpret, prefix_valid, res, cot):
    qn, qr, kvn, kr, idx, out, lse = res
    dout, dlse = cot
    grads = _KERNELS[backend].backward(qn, qr, kvn, kr, idx, out, lse, dout, dlse, scale=scale,
                                       **_kernel_kw(backend, interpret, prefix_valid))
    return (*grads, None)


_kernel_sparse_mla.defvjp(_kernel_fwd, _kernel_bwd)


def sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, backend: str | None = None,
                        interpret=False, chunk_size: int | None = None, prefix_valid: bool = False):
    """Sparse MLA returning (out [B,T,H,Dc], lse f32 [B,T,H], +inf for a query without valid slots).

    See `sparse_mla`. Both outputs are differentiable (the indexer KL loss reads the lse).
    """
    _check_shapes(q_nope, q_rope, kv_nope, k_rope, indices)

    def xla(*a):
        return reference.sparse_mla_with_lse(*a, scale=scale, chunk_size=chunk_size)

    def kernel(name):
        return lambda *a: _kernel_sparse_mla(*a, float(scale), name, interpret, bool(prefix_valid))

    args = (q_nope, q_rope, kv_nope, k_rope, indices)
    if backend is None:  # the lowering platform's kernel (the TPU one only at widths it compiles for)
        tpu_ok = sparse_mla_tpu.supports(q_nope.shape[-1], q_rope.shape[-1])
        return by_platform(*args, default=xla, tpu=kernel("pallas_tpu") if tpu_ok else None,
                           gpu=kernel("pallas_gpu"))
    b = resolve_backend(backend, IMPLEMENTED)
    return xla(*args) if b == "xla" else kernel(b)(*args)


def sparse_mla(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, backend: str | None = None,
               interpret=False, chunk_size: int | None = None, prefix_valid: bool = False):
    """Sparse MQA attention of DSA over the latent cache.

    Args:
      q_nope: [B, T, H, Dc] latent-absorbed queries (Dc = kv_lora_rank = 512 in the real model).
      q_rope: [B, T, H, Dr] rotary queries (Dr = 64).
      kv_nope: [B, S, Dc] latent rows (keys and values).
      k_rope: [B, S, Dr] rotary keys.
      indices: int32 [B, T, K] selected rows; entries < 0 are unused slots (the kernels also ignore
        entries >= S; the XLA path requires them in range).
      scale: softmax scale applied to both score terms.
      backend: "xla", "pallas_tpu", "pallas_gpu", or None (the kernel of the platform the program is lowered
        for; XLA on CPU, and on TPU at widths the TPU kernel does not take).
      interpret: run a Pallas kernel in interpret mode (CPU tests): True, or a `pltpu.InterpretParams`
        for the TPU kernel.
      chunk_size: query rows per step of the XLA path (ignored by the kernels).
      prefix_valid: promise that every row lists its valid slots first (as `indexer_topk` returns them);
        the TPU kernel then skips compacting the rows (a sort over [B, T, K]).
    Returns:
      [B, T, H, Dc]: softmax over the valid slots applied to kv_nope; zeros for a query with no valid slot.
      Decode is the same call with T = 1 (per-sequence lengths show up as -1 slots).
    """
    return sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, scale=scale, backend=backend,
                               interpret=interpret, chunk_size=chunk_size, prefix_valid=prefix_valid)[0]


def sparse_mla_cached(q_nope, q_rope, rows, layer, indices, *, scale: float, backend: str | None = None,
                      interpret=False, prefix_valid: bool = False):
    """`sparse_mla` over layer `layer` of a stacked packed latent cache (inference: no gradient).

    rows: uint32 [L, B, S, W] (`latent_pack.pack` rows, the TPU kernels' native cache); layer: int32 scalar.
    The TPU kernel reads the layer in place through its HBM ref (a decode step's layer scan copies no layer
    of the cache); the XLA and GPU paths unpack a slice of the layer first. Returns [B, T, H, Dc] in
    q_nope's dtype (the TPU kernel computes in bf16).
    """
    dc, dr = q_nope.shape[-1], q_rope.shape[-1]

    def unpacked(name):
        def run(qn, qr, rows, layer, idx):
            kvn, kr = latent_pack.unpack(jax.lax.dynamic_index_in_dim(rows, layer, 0, keepdims=False), dc, dr)
            return sparse_mla(qn, qr, kvn, kr, idx, scale=scale, backend=name, interpret=interpret,
                              prefix_valid=prefix_valid).astype(qn.dtype)
        return run

    def tpu(qn, qr, rows, layer, idx):
        return sparse_mla_tpu.forward_packed(qn, qr, rows, layer, idx, scale=scale, interpret=interpret,
                                             prefix_valid=prefix_valid)[0].astype(qn.dtype)

    args = (q_nope, q_rope, rows, jnp.asarray(layer, jnp.int32), indices)
    if backend is None:
        return by_platform(*args, default=unpacked("xla"),
                           tpu=tpu if sparse_mla_tpu.supports(dc, dr) else None, gpu=unpacked("pallas_gpu"))
    b = resolve_backend(backend, IMPLEMENTED)
    return tpu(*args) if b == "pallas_tpu" else unpacked(b)(*args)
