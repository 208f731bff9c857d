"""Training losses and the aux-loss-free router-bias update (spec §6.3, §8.2).

All token losses return (sum, count) so gradient accumulation can normalise by the token count of the
whole global batch: the accumulated gradient then equals the gradient of the full-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.layers import dense_fp32


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted next-token cross-entropy.

    logits f32 [B, L, V]; targets int [B, L]; weights f32 [B, L] (0 = not trained: padding, prompt tokens).
    Returns (Σ weights·nll, Σ weights), both f32 scalars.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)


def ce_chunks(batch: int, length: int, vocab: int, chunk_bytes: int) -> int:
    """How many chunks `head_cross_entropy` splits the positions into: the fewest (a divisor of `length`)
    whose f32 logits [batch, length / n, vocab] fit in `chunk_bytes`; 1 when the whole thing fits."""
    for n in range(1, length + 1):
        if length % n == 0 and batch * (length // n) * vocab * 4 <= chunk_bytes:
            return n
    return length


def strided_chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, L, ...] -> [n, B, L/n, ...]: chunk k holds positions k, k+n, k+2n, ... (see head_cross_entropy)."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, length // n, n) + x.shape[2:]), 2, 0)


def head_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       chunk_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(hidden @ head, ...)` without ever holding all the logits.

    hidden [B, L, D]; head [D, V] (the lm head); targets int [B, L]; weights f32 [B, L].
    Returns (Σ weights·nll, Σ weights). With a 129K vocabulary the f32 logits of a 4K-token row are 2 GB,
    and autodiff would keep them plus their softmax and cotangent. Here the positions are split into n
    chunks (`ce_chunks`) that a rematerialised scan visits one at a time, so the forward and the backward
    each hold one chunk's logits; the backward recomputes them (one extra head matmul).
    Chunk k takes the strided positions k, k+n, k+2n, ...: reshaping L -> [L/n, n] keeps a sharding of
    L (context parallelism) on the outer factor, so the scan walks an unsharded axis and needs no gather.
    """
    b, length, _ = hidden.shape
    n = 1 if chunk_bytes is None else ce_chunks(b, length, head.shape[-1], chunk_bytes)
    if n == 1:
        return cross_entropy(dense_fp32(hidden, head), targets, weights)

    @jax.checkpoint
    def chunk(carry, xs):
        h, t, w = xs
        nll, count = cross_entropy(dense_fp32(h, head), t, w)
        return (carry[0] + nll, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (nll, count), _ = jax.lax.scan(chunk, (zero, zero), (strided_chunks(hidden, n), strided_chunks(targets, n),
                                                     strided_chunks(weights, n)))
    return nll, count


def mtp_targets(targets: jax.Array, weights: jax.Array,
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Targets of the depth-1 MTP head: position i predicts token i+2 = targets[i+1] (same document).

    targets/weights/segment_ids [B, L] -> (mtp_targets [B, L], mtp_weights [B, L]); the last position
    and positions whose i+1 lies in another packed document get weight 0.
    """
    t2 = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
    w2 = jnp.concatenate([weights[:, 1:], jnp.zeros_like(weights[:, :1])], axis=1)
    if segment_ids is not None:
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
        w2 = jnp.where(same, w2, 0.0)
    return t2, w2


def balance_loss(load: jax.Array, mean_score: jax.Array) -> jax.Array:
    """DeepSeek-V3's complementary sequence-wise balance loss, without α (spec §6.3).

    load [L_moe, B, E]: fraction of each sequence's T·K_r routed slots per expert (so f_i = E·load_i);
    mean_score [L_moe, B, E]: P_i, the mean normalised affinity. Returns Σ_layers mean_sequences
    Σ_i f_i·P_i (= 1 per layer when perfectly balanced). Only P carries gradient (to the router).
    """
    e = load.shape[-1]
    per_seq = jnp.sum(e * jax.lax.stop_gradient(load) * mean_score, axis=-1)  # [L_moe, B]
    return jnp.sum(jnp.mean(per_seq, axis=-1))


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: b_i -= γ for overloaded experts, += γ for underloaded ones (spec §6.3).

    bias f32 [L_moe, E] (or [E]); load [L_moe, E] (or [E]): each expert's share of the batch's routed
    slots (sums to 1 over E). "Overloaded" means above the balanced share 1/E.
    """
    e = load.shape[-1]
    return bias + rate * jnp.sign(1.0 / e - load).astype(bias.dtype)


def load_imbalance(load: jax.Array) -> jax.Array:
    """max_i load_i · E per layer (1.0 = perfectly balanced). load [..., E] -> [...]."""
    return jnp.max(load, axis=-1) * load.shape[-1]
