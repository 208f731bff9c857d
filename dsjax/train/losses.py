"""Training losses and the aux-loss-free router-bias update (spec §6.3, §8.2).

All token losses return (sum, count) so gradient accumulation can normalise by the token count of the
whole global batch: the accumulated gradient then equals the gradient of the full-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
