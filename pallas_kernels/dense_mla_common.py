"""What the dense (flash) MLA kernels share: visibility inputs, and the key-block ranges that causal block
skipping walks.

Visibility stays structured (positions and segment ids, never a mask): key s is visible to query t iff
k_pos[s] <= q_pos[t], k_pos[s] >= 0 and k_seg[s] == q_seg[t]. The kernels evaluate it per tile from the
tile's own positions. Which tiles can hold a visible pair is decided here, from per-block summaries
(O((T + S) / block) work, no [T, S] or [T/bq, S/bk] array):

  * a visible pair has (k_seg, k_pos) <= (q_seg, q_pos) lexicographically. For query block i, every key
    block j >= hi[i] has a suffix minimum of its (seg, pos) pairs above block i's maximum pair, so nothing
    from j on is visible; every block j < lo[i] has a prefix maximum of its segment ids below block i's
    smallest segment. The kernels run [lo, hi) and mask inside. This is exact for any positions (packed
    documents, padding, a cache whose slots are positions); it skips most when positions rise along the
    sequence, as in causal self-attention, where it is the usual flash-attention diagonal.
  * the backward's key-block programs use the mirrored ranges over query blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_mla_common import pad_axis

I32 = jnp.int32
_BIG, _SMALL = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min


def visibility_inputs(q_positions, k_positions, q_segment_ids, k_segment_ids, b: int, t: int, s: int):
    """int32 [B, T], [B, S] positions and segment ids (one segment when none are given; positions default
    to 0..n-1)."""
    def pos(x, n):
        if x is None:
            return jnp.broadcast_to(jnp.arange(n, dtype=I32), (b, n))
        x = jnp.asarray(x, I32)
        return jnp.broadcast_to(x, (b, n))

    def seg(x, n):
        return jnp.zeros((b, n), I32) if x is None else jnp.broadcast_to(jnp.asarray(x, I32), (b, n))

    return pos(q_positions, t), pos(k_positions, s), seg(q_segment_ids, t), seg(k_segment_ids, s)


def pad_visibility(qp, qs, kp, ks, tp: int, sp: int):
    """Pads queries to tp and keys to sp with position -1 (sees nothing / seen by nothing)."""
    return pad_axis(qp, 1, tp, -1), pad_axis(qs, 1, tp, 0), pad_axis(kp, 1, sp, -1), pad_axis(ks, 1, sp, 0)


def _lex_lt(a_seg, a_pos, b_seg, b_pos):
    return (a_seg < b_seg) | ((a_seg == b_seg) & (a_pos < b_pos))


def _block_pairs(pos, seg, block: int, largest: bool):
    """Per block of `block` entries: the lexicographic max (largest) or min pair (seg, pos) over entries with
    pos >= 0, and the max / min segment id over them; empty blocks get the neutral values. [B, n/block]."""
    b, n = pos.shape
    pos, seg = pos.reshape(b, n // block, block), seg.reshape(b, n // block, block)
    valid = pos >= 0
    fill = _SMALL if largest else _BIG
    red = jnp.max if largest else jnp.min
    s_ext = red(jnp.where(valid, seg, fill), axis=-1)
    p_ext = red(jnp.where(valid & (seg == s_ext[..., None]), pos, fill), axis=-1)
    s_other = (jnp.min if largest else jnp.max)(jnp.where(valid, seg, _BIG if largest else _SMALL), axis=-1)
    return s_ext, p_ext, s_other


def _scan_pairs(seg, pos, reverse: bool, largest: bool):
    """Running lexicographic max (prefix) or min (suffix, reverse=True) of pairs along axis 1."""
    def combine(a, b):
        a_s, a_p = a
        b_s, b_p = b
        take_b = _lex_lt(a_s, a_p, b_s, b_p) if largest else _lex_lt(b_s, b_p, a_s, a_p)
        return jnp.where(take_b, b_s, a_s), jnp.where(take_b, b_p, a_p)

    return jax.lax.associative_scan(combine, (seg, pos), reverse=reverse, axis=1)


def _count(sorted_keys, x, below):
    """Per row, how many entries of the monotone sequence `sorted_keys` (tuple of [B, n]; compared
    lexicographically) are < x (below=True) or <= x (below=False); x: tuple of [B, m]. A binary search."""
    n = sorted_keys[0].shape[1]
    lo = jnp.zeros(x[0].shape, I32)
    hi = jnp.full(x[0].shape, n, I32)

    def take(a, idx):
        return jnp.take_along_axis(a, jnp.minimum(idx, n - 1), axis=1)

    for _ in range(n.bit_length() + 1):
        mid = (lo + hi) // 2
        ks = [take(k, mid) for k in sorted_keys]
        if len(ks) == 2:
            lt = _lex_lt(ks[0], ks[1], x[0], x[1])
            eq = (ks[0] == x[0]) & (ks[1] == x[1])
        else:
            lt, eq = ks[0] < x[0], ks[0] == x[0]
        go_right = (lo < hi) & (lt | (eq & ~below))
        lo, hi = jnp.where(go_right, mid + 1, lo), jnp.where((lo < hi) & ~go_right, mid, hi)
    return lo


def key_block_ranges(qp, qs, kp, ks, block_q: int, block_k: int):
    """[lo, hi) key blocks each query block must visit -> int32 ([B, Tp/bq], [B, Tp/bq]); hi >= lo.

    qp, qs [B, Tp] and kp, ks [B, Sp] (padded to the blocks, padding at position -1)."""
    q_seg_max, q_pos_max, q_seg_min = _block_pairs(qp, qs, block_q, largest=True)
    k_seg_min, k_pos_min, k_seg_max = _block_pairs(kp, ks, block_k, largest=False)
    suf_seg, suf_pos = _scan_pairs(k_seg_min, k_pos_min, reverse=True, largest=False)
    hi = _count((suf_seg, suf_pos), (q_seg_max, q_pos_max), below=False)
    pre_seg = jax.lax.cummax(k_seg_max, axis=1)
    lo = _count((pre_seg,), (q_seg_min,), below=True)
    return lo, jnp.maximum(hi, lo)


def query_block_ranges(qp, qs, kp, ks, block_q: int, block_k: int):
    """[lo, hi) query blocks that may see each key block (the backward's dK/dV programs) -> int32
    ([B, Sp/bk], [B, Sp/bk])."""
    q_seg_max, q_pos_max, q_seg_min = _block_pairs(qp, qs, block_q, largest=True)
    k_seg_min, k_pos_min, k_seg_max = _block_pairs(kp, ks, block_k, largest=False)
    pre_seg, pre_pos = _scan_pairs(q_seg_max, q_pos_max, reverse=False, largest=True)
    lo = _count((pre_seg, pre_pos), (k_seg_min, k_pos_min), below=True)
    suf_seg = jax.lax.cummin(q_seg_min, axis=1, reverse=True)
    hi = _count((suf_seg,), (k_seg_max,), below=False)
    return lo, jnp.maximum(hi, lo)
