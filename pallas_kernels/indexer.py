"""Dispatch of the lightning-indexer ops (scores, and chunked top-k selection)."""

from __future__ import annotations

from pallas_kernels import reference
from pallas_kernels.dispatch import resolve_backend

IMPLEMENTED = ("xla",)


def indexer_scores(q, w, k, *, q_positions, k_positions=None, q_segment_ids=None, k_segment_ids=None,
                   backend: str | None = None, interpret: bool = False, chunk_size: int | None = None):
    """Lightning-indexer scores Σ_h w·ReLU(q·k) -> float32 [B, T, S], -inf where the key is not visible.

    q: [B, T, Hi, Di], w: [B, T, Hi] (softmax scale folded in), k: [B, S, Di];
    q_positions: [B, T] or [T]; k_positions: [B, S] or [S] (default arange(S)); visibility is
    k_pos <= q_pos, k_pos >= 0 and equal segment ids.
    """
    b = resolve_backend(backend, IMPLEMENTED)
    del interpret
    assert b == "xla"
    return reference.indexer_scores(q, w, k, q_positions=q_positions, k_positions=k_positions,
                                    q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                    chunk_size=chunk_size)


def indexer_topk(q, w, k, *, topk: int, q_positions, k_positions=None, q_segment_ids=None, k_segment_ids=None,
                 backend: str | None = None, interpret: bool = False, chunk_size: int | None = None):
    """Indices of the top-`topk` indexer scores per query -> int32 [B, T, min(topk, S)]; -1 fills the slots
    beyond the visible keys. Works over query chunks: peak memory O(T_chunk · S), never O(T · S)."""
    b = resolve_backend(backend, IMPLEMENTED)
    del interpret
    assert b == "xla"
    return reference.indexer_topk(q, w, k, topk=topk, q_positions=q_positions, k_positions=k_positions,
                                  q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                                  chunk_size=chunk_size)
