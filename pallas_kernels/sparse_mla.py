"""Dispatch of the MLA attention ops (sparse DSA gather, and dense causal)."""

from __future__ import annotations

from pallas_kernels import reference
from pallas_kernels.dispatch import resolve_backend

IMPLEMENTED = ("xla",)


def sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, backend: str | None = None,
                        interpret: bool = False, chunk_size: int | None = None):
    """Sparse MLA returning (out [B,T,H,Dc], lse f32 [B,T,H]); see `sparse_mla`."""
    b = resolve_backend(backend, IMPLEMENTED)
    del interpret
    assert b == "xla"
    return reference.sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, scale=scale,
                                         chunk_size=chunk_size)


def sparse_mla(q_nope, q_rope, kv_nope, k_rope, indices, *, scale: float, backend: str | None = None,
               interpret: bool = False, chunk_size: int | None = None):
    """Sparse MQA attention of DSA over the latent cache.

    Args:
      q_nope: [B, T, H, Dc] latent-absorbed queries (Dc = kv_lora_rank = 512 in the real model).
      q_rope: [B, T, H, Dr] rotary queries (Dr = 64).
      kv_nope: [B, S, Dc] latent rows (keys and values).
      k_rope: [B, S, Dr] rotary keys.
      indices: int32 [B, T, K] selected rows; entries < 0 are unused slots.
      scale: softmax scale applied to both score terms.
      backend: "xla", "pallas_tpu", "pallas_gpu", or None (from the default device).
      interpret: run a Pallas kernel in interpret mode (CPU tests).
    Returns:
      [B, T, H, Dc]: softmax over the valid slots applied to kv_nope; zeros for a query with no valid slot.
    """
    return sparse_mla_with_lse(q_nope, q_rope, kv_nope, k_rope, indices, scale=scale, backend=backend,
                               interpret=interpret, chunk_size=chunk_size)[0]


def dense_mla(q_nope, q_rope, kv_nope, k_rope, *, scale: float, q_positions=None, k_positions=None,
              q_segment_ids=None, k_segment_ids=None, backend: str | None = None, interpret: bool = False,
              chunk_size: int | None = None):
    """Causal MQA attention over every visible latent row (DSA when all causal keys are selected).

    Shapes as `sparse_mla`; visibility is k_pos <= q_pos, k_pos >= 0 and equal segment ids.
    Runs the XLA chunked path on every platform (dense causal attention is not DSA's bottleneck).
    """
    del backend, interpret
    return reference.dense_mla(q_nope, q_rope, kv_nope, k_rope, scale=scale, q_positions=q_positions,
                               k_positions=k_positions, q_segment_ids=q_segment_ids,
                               k_segment_ids=k_segment_ids, chunk_size=chunk_size)
