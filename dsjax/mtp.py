"""Multi-token prediction (spec §8): one extra block that predicts token i+2 from position i.

    z = eh_proj([enorm(Emb(t_{i+1})), hnorm(h_i)])      # embedding first, as the released weights expect
    z = Block(z)                                         # a full V3.2 layer with its own indexer
    logits_{i+2} = lm_head(norm(z))                      # embedding table and head shared with the model

h_i is the main model's final-normed hidden state (as vLLM / SGLang feed it). The MTP output after its
norm is what a further draft step would use as h. With a cache (`mtp_forward(cache=...)`) the block keeps its
own latents, so speculative decoding drafts one token per step (`dsjax.generate(..., mtp=True)`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.latents import Latents
from dsjax.layers import add_rms_norm, dense, rms_norm
from dsjax.model import block, default_positions, embed, lm_head
from dsjax.parallel import Parallelism
from dsjax.rope import cos_sin


def mtp_forward(params: Mapping[str, Any], hidden: jax.Array, next_tokens: jax.Array, config: Config, *,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                cache: Latents | None = None, return_stats: bool = False,
                parallel: Parallelism | None = None) -> tuple:
    """MTP hidden state [B, T, D] and the MTP block's updated cache (and, with return_stats, its MoEStats
    or None: training needs them for the balance loss and the router-bias update).

    hidden: the main model's final-normed hidden [B, T, D] at `positions`; next_tokens: t_{i+1} [B, T].
    cache: optional MTP-layer latents (leaves [B, S_max, .], slot = position) for speculative drafting;
    the new rows are written at `positions` (< 0: dropped) and the block attends over the whole cache.
    parallel: the run's layout (None = one device), as in `model.forward_hidden`.
    """
    out, cache, stats, _, _ = _mtp(params, hidden, next_tokens, config, positions, segment_ids, cache, None,
                                   parallel)
    return (out, cache, stats) if return_stats else (out, cache)


def mtp_train_forward(params: Mapping[str, Any], hidden: jax.Array, next_tokens: jax.Array, config: Config, *,
                      positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                      indexer_loss: str | None = None, selection: jax.Array | None = None,
                      experts: jax.Array | None = None, parallel: Parallelism | None = None
                      ) -> tuple[jax.Array, Any, jax.Array | None, jax.Array | None]:
    """Training form of `mtp_forward` (no cache): (MTP hidden [B, L, D], MoEStats or None, the MTP block's
    indexer KL loss or None, the keys its DSA attended int32 [B, L, K] or None). indexer_loss: None,
    "dense_warmup" or "sparse", as in `model.forward_hidden`: the block's own lightning indexer learns from
    the KL to its attention in the DSA training stages. selection, experts: keys and MoE routing int32
    [B, L, k] to replay (an earlier call's: its keys, and `MoEStats.experts`)."""
    out, _, stats, iloss, idx = _mtp(params, hidden, next_tokens, config, positions, segment_ids, None,
                                     indexer_loss, parallel, selection, experts)
    return out, stats, iloss, idx


@jax.named_scope("mtp")
def _mtp(params, hidden, next_tokens, config: Config, positions, segment_ids, cache, indexer_loss, parallel,
         selection=None, experts=None):
    c = config
    if "mtp" not in params:
        raise ValueError("these params have no MTP module (num_nextn_predict_layers=0 or not loaded).")
    p = params["mtp"]
    positions = default_positions(next_tokens) if positions is None else positions
    cos, sin = cos_sin(c, positions)
    e = rms_norm(embed(params, next_tokens, c), p["enorm"], c.rms_norm_eps)
    h = rms_norm(hidden.astype(c.compute_dtype), p["hnorm"], c.rms_norm_eps)
    z = dense(jnp.concatenate([e, h], axis=-1), p["eh_proj"])
    (f, resid), stats, cache, iloss, idx = block(p["block"], (z, jnp.zeros_like(z)), cos, sin, c,
                                                 positions=positions, segment_ids=segment_ids, is_moe=c.mtp_is_moe,
                                                 cache=cache, indexer_loss=indexer_loss, selection=selection,
                                                 experts=experts, parallel=parallel)
    out, _ = add_rms_norm(f, resid, p["norm"], c.rms_norm_eps)
    return out, cache, stats, iloss, idx


def mtp_hidden(params: Mapping[str, Any], hidden: jax.Array, next_tokens: jax.Array, config: Config, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """MTP hidden state [B, L, D] from the main hidden [B, L, D] and the next tokens t_{i+1} [B, L]."""
    return mtp_forward(params, hidden, next_tokens, config, positions=positions, segment_ids=segment_ids)[0]


def mtp_logits(params: Mapping[str, Any], hidden: jax.Array, tokens: jax.Array, config: Config, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits f32 [B, L, V] where position i predicts token i+2.

    tokens: the input tokens [B, L]; position i reads t_{i+1} (the last position reads a pad id 0 and
    its output is meaningless). Train on positions 0..L-3 against tokens[:, 2:].
    """
    next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return lm_head(params, mtp_hidden(params, hidden, next_tokens, config, positions=positions,
                                      segment_ids=segment_ids))
