"""The TPU kernels' native latent-cache row: nope and rope fused, bf16 pairs packed into uint32 words.

A latent row is kv_nope [Dc] (512) and k_rope [Dr] (64) in bf16. The TPU sparse-MLA kernel gathers one
row per selected slot with one DMA. A bf16 VMEM buffer packs two *rows* per 32-bit sublane, so a one-row
DMA into it is not an addressable unit (Mosaic: "Offsets along tiled dimensions must be aligned to
tiles"); a uint32 row is. So the row is stored as W = (Dc + Dr) / 2 words:

    word j       (j < Dc/2): low half = nope[j],  high half = nope[j + Dc/2]
    word Dc/2 + j (j < Dr/2): low half = rope[j],  high half = rope[j + Dr/2]

Pairing column j with column j + Dc/2 (not 2j with 2j+1) makes the unpack lane-aligned: the low halves
of words [0, Dc/2) are the first half of the nope row and the high halves the second half, so the
kernel rebuilds the row with one aligned lane concatenation and the queries keep their natural layout.
One row is 576 bf16 = 1,152 B of data: one DMA instead of two.

The stored row is padded with zero words to a multiple of 128 (`row_words`: 384 for V3.2). XLA:TPU tiles
HBM arrays (8, 128), so a row-major [S, 288] array occupies 384 lanes per row anyway, and with a minor dim
that is not a multiple of 128 XLA's default layout puts S minor instead, which the kernel would have to
relayout (a whole-cache copy per decode step). With 384 the default layout is row-major and the kernels
DMA only the 288 data words of a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

U32 = jnp.uint32
_HI_MASK = 0xFFFF0000


def packed_width(dc: int, dr: int) -> int:
    """uint32 words per packed row."""
    if dc % 2 or dr % 2:
        raise ValueError(f"packed latent rows need even widths, got Dc={dc}, Dr={dr}.")
    return (dc + dr) // 2


def row_words(dc: int, dr: int) -> int:
    """uint32 words per stored row: `packed_width` rounded up to the 128-lane tile."""
    return -(-packed_width(dc, dr) // 128) * 128


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(U32)


def pack(kv_nope: jax.Array, k_rope: jax.Array) -> jax.Array:
    """kv_nope [..., Dc], k_rope [..., Dr] -> uint32 [..., row_words] (values rounded to bf16; the words
    past (Dc + Dr) / 2 are zero)."""
    dc, dr = kv_nope.shape[-1], k_rope.shape[-1]
    word = lambda x, h: (_bits(x[..., h:]) << 16) | _bits(x[..., :h])
    # built from the 512- and 64-wide inputs directly: an intermediate [..., 288] array would get an
    # S-minor layout from XLA:TPU and a relayout copy
    pad = jnp.zeros(kv_nope.shape[:-1] + (row_words(dc, dr) - packed_width(dc, dr),), U32)
    return jnp.concatenate([word(kv_nope, dc // 2), word(k_rope, dr // 2), pad], axis=-1)


def halves(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 [..., W] -> (low halves, high halves) as exact f32 [..., W] (also used inside the kernels:
    a shift or mask and a same-width bitcast, no 16-bit vector ops)."""
    lo = jax.lax.bitcast_convert_type(packed << 16, jnp.float32)
    hi = jax.lax.bitcast_convert_type(packed & U32(_HI_MASK), jnp.float32)
    return lo, hi


def unpack(packed: jax.Array, dc: int, dr: int) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pack`: uint32 [..., row_words] -> (kv_nope bf16 [..., Dc], k_rope bf16 [..., Dr])."""
    lo, hi = halves(packed[..., :packed_width(dc, dr)])
    h = dc // 2
    nope = jnp.concatenate([lo[..., :h], hi[..., :h]], axis=-1)
    rope = jnp.concatenate([lo[..., h:], hi[..., h:]], axis=-1)
    return nope.astype(jnp.bfloat16), rope.astype(jnp.bfloat16)


def split_rope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., Dr] -> the columns paired in the low halves [..., Dr/2] and in the high halves."""
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]
