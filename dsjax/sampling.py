"""Token samplers: greedy, or temperature with top-k and top-p (nucleus) truncation.

Order (as HF `generate`): logits / temperature -> keep the top_k largest -> keep the smallest set whose
probability reaches top_p -> sample. The parameters are traced scalars, so changing them between calls
does not recompile the decode step; only greedy-vs-sampling is a static choice (greedy skips the sort).

Randomness is per sequence and per emitted token: the k-th new token of sequence b is drawn with
`token_keys(seed, b, k)`. A sequence's samples therefore depend only on the seed, its index and its own
history, never on how many steps the batch took, which makes speculative decoding (which emits one or two
tokens per step) sample exactly the tokens plain decoding samples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
    """Sampling parameters. temperature 0 = greedy; top_k 0 = no top-k; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self, vocab_size: int) -> "Sampling":
        """Validate (one clear ValueError naming the parameter) and return self."""
        t, p, k = self.temperature, self.top_p, self.top_k
        if not isinstance(t, (int, float)) or not t >= 0.0:
            raise ValueError(f"temperature={t!r}: must be a number >= 0 (0 = greedy).")
        if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p={p!r}: must be in (0, 1] (1 = no nucleus truncation).")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k={k!r}: must be an integer >= 0 (0 = no top-k truncation).")
        if k > vocab_size:
            raise ValueError(f"top_k={k} exceeds the vocabulary size {vocab_size}.")
        return self


def token_keys(seed_key: jax.Array, seq_index: jax.Array, count: jax.Array) -> jax.Array:
    """One PRNG key per sequence for its `count`-th new token. seq_index, count: int [B] -> keys [B]."""
    return jax.vmap(lambda i, n: jax.random.fold_in(jax.random.fold_in(seed_key, i), n))(seq_index, count)


def truncate(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside the top-k / top-p set to -inf. logits f32 [B, V] (already temperature-scaled).

    Ties at the cut-off are all kept. top_k <= 0 and top_p >= 1 disable their cut.
    """
    v = logits.shape[-1]
    srt = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1])[..., None], axis=-1)
    srt = jnp.where(srt >= kth, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    # Keep sorted entry i while the mass strictly before it is < top_p: the smallest prefix reaching top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (top_p >= 1.0)
    cut = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(cut, kth), logits, -jnp.inf)


def sampling_logits(logits: jax.Array, *, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """The logits the sampler draws from: tempered, -inf outside the kept vocabulary. [B, V] -> f32 [B, V]."""
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    return truncate(scaled, jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))


def sample(logits: jax.Array, keys: jax.Array, *, greedy: bool, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> jax.Array:
    """Next token ids int32 [B] from logits [B, V] (f32). keys: [B] PRNG keys (unused when greedy)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return draw(sampling_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k), keys)


def draw(drawn: jax.Array, keys: jax.Array) -> jax.Array:
    """Token ids int32 [B] from `sampling_logits` output [B, V] (one key per row)."""
    return jax.vmap(jax.random.categorical)(keys, drawn).astype(jnp.int32)


def pack_mask(mask: jax.Array) -> jax.Array:
    """bool [..., V] -> uint32 [..., ceil(V/32)] (bit j of word w: token 32·w + j). A recorded rollout
    (`dsjax.generate`, record=True) keeps its sampling masks so: V/8 bytes a token (16 KB at V = 129,280)."""
    v = mask.shape[-1]
    pad = -v % 32
    m = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)]).reshape(mask.shape[:-1] + (-1, 32))
    return jnp.sum(m.astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_mask(bits: jax.Array, vocab: int) -> jax.Array:
    """Inverse of `pack_mask`: uint32 [..., W] -> bool [..., vocab]."""
    m = (bits[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return m.reshape(bits.shape[:-1] + (-1,))[..., :vocab].astype(bool)
