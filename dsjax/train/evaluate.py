"""How good is the lightning indexer? Measured against the main attention it stands in for (spec §10):

    kl      mean over queries of KL(p || softmax(I)), p the head-summed dense attention probabilities over
            every causal key (the warm-up loss, `indexer_loss.dense_kl`);
    recall  fraction of the indexer's top-k keys that are among the k keys of highest p, over queries that
            see more than k keys (`indexer_loss.dense_recall`). A random indexer scores about k / (keys
            visible); a perfect one 1.

Both are means over every layer, from one dense forward each (no gradient).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np

from dsjax.config import Config
from dsjax.model import forward_hidden


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _score(params: Any, batch: Mapping[str, jax.Array], config: Config, mode: str) -> jax.Array:
    aux = forward_hidden(params, batch["tokens"], config, positions=batch["positions"],
                         segment_ids=batch["segment_ids"], indexer_loss=mode)
    return aux.indexer_loss


def indexer_quality(params: Any, config: Config, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{"kl", "recall", "chance"} of the indexer on `batch` (tokens / positions / segment_ids [B, L]).
    chance: the recall a random choice of top-k keys would get on the same queries."""
    b = {k: jax.numpy.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")}
    pos = np.asarray(batch["positions"])
    visible = pos[pos >= config.index_topk] + 1  # causal keys of each query with more than top-k of them
    chance = float(np.mean(config.index_topk / visible)) if visible.size else 1.0
    return {"kl": float(_score(params, b, config, "dense_warmup")),
            "recall": float(_score(params, b, config, "dense_recall")), "chance": chance}
