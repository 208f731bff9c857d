"""Dispatch of dense causal MLA (V3, short prefill, the dense warm-up): flash kernels or the XLA scan.

`dense_mla` / `dense_mla_with_lse` run one of three implementations of the same op:
  * "pallas_tpu": `dense_mla_tpu` (Mosaic: key blocks pipelined by BlockSpecs, several heads per step);
  * "pallas_gpu": `dense_mla_gpu` (Triton: (token, head) rows as the matmul M dimension);
  * "xla": `reference.dense_mla_with_lse` (query-chunk scan; the CPU path and the oracle).
All keep O(T) memory (online softmax over key blocks; no [T, S] score or mask array) and skip key blocks
that no query of a block can see (`dense_mla_common`). The kernels are differentiable through one
`custom_vjp`: the forward saves (out, lse), the backward recomputes P from lse (a dQ kernel and a dK/dV
kernel, no atomics).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import dense_mla_gpu, dense_mla_tpu, reference
from pallas_kernels.dense_mla_common import visibility_inputs
from pallas_kernels.dispatch import by_platform, resolve_backend

IMPLEMENTED = ("xla", "pallas_tpu", "pallas_gpu")
_KERNELS = {"pallas_tpu": dense_mla_tpu, "pallas_gpu": dense_mla_gpu}


def _vis_kw(vis):
    return dict(zip(("q_positions", "k_positions", "q_segment_ids", "k_segment_ids"), vis))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kernel_dense_mla(qn, qr, kvn, kr, vis, scale, backend, interpret):
    return _KERNELS[backend].forward(qn, qr, kvn, kr, scale=scale, interpret=interpret, **_vis_kw(vis))


def _kernel_fwd(qn, qr, kvn, kr, vis, scale, backend, interpret):
    out, lse = _kernel_dense_mla(qn, qr, kvn, kr, vis, scale, backend, interpret)
    return (out, lse), (qn, qr, kvn, kr, vis, out, lse)


def _kernel_bwd(scale, backend, interpret, res, cot):
    qn, qr, kvn, kr, vis, out, lse = res
    dout, dlse = cot
    grads = _KERNELS[backend].backward(qn, qr, kvn, kr, out, lse, dout, dlse, scale=scale, interpret=interpret,
                                       **_vis_kw(vis))
    return (*grads, tuple(None for _ in vis))


_kernel_dense_mla.defvjp(_kernel_fwd, _kernel_bwd)


def dense_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
                       q_segment_ids=None, k_segment_ids=None, backend: str | None = None, interpret=False,
                       chunk_size: int | None = None):
    """Dense causal MLA returning (out [B, T, H, Dc], lse f32 [B, T, H], +inf for a query that sees no key).

    See `dense_mla`. Both outputs are differentiable (the dense indexer KL reads the lse).
    """
    b, t = q_nope.shape[:2]
    s = kv_nope.shape[1]
    vis = visibility_inputs(q_positions, k_positions, q_segment_ids, k_segment_ids, b, t, s)

    def xla(qn, qr, kvn, kr, vis):
        return reference.dense_mla_with_lse(qn, qr, kvn, kr, scale=scale, chunk_size=chunk_size, **_vis_kw(vis))

    def kernel(name):
        return lambda *a: _kernel_dense_mla(*a, float(scale), name, interpret)

    args = (q_nope, q_rope, kv_nope, k_rope, vis)
    if backend is None:
        tpu_ok = dense_mla_tpu.supports(q_nope.shape[-1], q_rope.shape[-1])
        return by_platform(*args, default=xla, tpu=kernel("pallas_tpu") if tpu_ok else None,
                           gpu=kernel("pallas_gpu"))
    name = resolve_backend(backend, IMPLEMENTED)
    return xla(*args) if name == "xla" else kernel(name)(*args)


def dense_mla(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
              q_segment_ids=None, k_segment_ids=None, backend: str | None = None, interpret=False,
              chunk_size: int | None = None):
    """Causal MQA attention over every visible latent row (DSA when all causal keys are selected).

    Args:
      q_nope [B, T, H, Dc], q_rope [B, T, H, Dr]: absorbed and rotary queries; kv_nope [B, S, Dc],
        k_rope [B, S, Dr]: latent rows and rotary keys.
      q_positions [B, T] / k_positions [B, S] (or [T] / [S]; default 0..n-1), q_segment_ids / k_segment_ids:
        visibility is k_pos <= q_pos, k_pos >= 0 and equal segment ids, evaluated per tile (never a mask).
      backend: "xla", "pallas_tpu", "pallas_gpu", or None (the kernel of the platform the program is lowered
        for). interpret: run a Pallas kernel in interpret mode (CPU tests). chunk_size: query rows per step
        of the XLA path.
    Returns:
      [B, T, H, Dc]; zeros for a query that sees no key.
    """
    return dense_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, scale=scale, q_positions=q_positions,
                              k_positions=k_positions, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                              backend=backend, interpret=interpret, chunk_size=chunk_size)[0]
