"""The DeepSeek V3 / V3.2 transformer as pure functions over the params pytree.

    tokens -> embed -> dense stack (scan) -> MoE stack (scan) -> final norm -> lm head   (-> MTP)

Each block is pre-norm with the official fused residual (spec §2.3): the carry is (h, resid) and every
norm sees the unrounded fp32 sum h + resid. Layer stacks run under `jax.lax.scan`, so compile time does
not grow with depth.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import attention, indexer_loss as indexer_loss_lib, moe as moe_lib, parallel as parallel_lib
from dsjax.config import Config
from dsjax.latents import Latents
from dsjax.layers import add_rms_norm, dense_fp32, swiglu, weight
from dsjax.parallel import ACTIVATIONS, Parallelism, constrain
from dsjax.rope import cos_sin

Params = Mapping[str, Any]


class Aux(NamedTuple):
    """Side outputs of a forward pass."""

    hidden: jax.Array  # [B, L, D] final-normed hidden state (the MTP module's input)
    moe_load: jax.Array | None  # f32 [L_moe, B, E] routed-slot fraction per expert, per layer and sequence
    moe_score: jax.Array | None  # f32 [L_moe, B, E] mean normalised affinity per expert
    cache: dict[str, Any] | None = None  # updated KV cache {"dense": Latents, "moe": Latents} (leading layer axis)
    indexer_loss: jax.Array | None = None  # f32 [] indexer KL loss (or top-k recall) averaged over layers
    # with record_selection: the keys each DSA layer attended, {"dense": int32 [B, L, n_dense, K], "moe": ...}
    # (only stacks whose attention is sparse), and the MoE routing, "moe_experts": [B, L, n_moe, k]: the
    # `selection` argument that replays them
    selection: dict[str, jax.Array] | None = None


@jax.named_scope("embed")
def embed(params: Params, tokens: jax.Array, config: Config) -> jax.Array:
    """Token embedding in the compute dtype. tokens: int [B, L] -> [B, L, D]."""
    return jnp.take(weight(params["embed"]), tokens, axis=0).astype(config.compute_dtype)


def block(p: Params, carry: tuple[jax.Array, jax.Array], cos: jax.Array, sin: jax.Array, config: Config, *,
          positions: jax.Array, segment_ids: jax.Array | None, is_moe: bool,
          cache: Latents | None = None, layer: jax.Array | None = None,
          indexer_loss: str | None = None, selection: jax.Array | None = None,
          experts: jax.Array | None = None, parallel: Parallelism | None = None):
    """One decoder layer on the (h, resid) carry -> (new carry, MoE stats or None, updated cache or None,
    indexer KL loss or None, the keys its DSA attended or None). `layer`: this layer's index when `cache`
    is the whole stack's cache (see `attention.mla`). selection: int32 [B, T, K] keys to replay; experts:
    int32 [B, T, k] MoE routing to replay (`MoEStats.experts` holds the routing used).
    parallel: the run's layout (None = one device)."""
    h, resid = (constrain(a, ACTIVATIONS, parallel) for a in carry)  # the residual stream, [B, T, D]
    eps = config.rms_norm_eps
    with jax.named_scope("attention"):
        x, resid = add_rms_norm(h, resid, p["attn_norm"], eps)
        a, cache, iloss, idx = attention.mla(p["attn"], x, cos, sin, config, positions=positions,
                                             segment_ids=segment_ids, cache=cache, layer=layer,
                                             indexer_loss=indexer_loss, selection=selection, parallel=parallel)
    with jax.named_scope("moe" if is_moe else "mlp"):
        x, resid = add_rms_norm(constrain(a, ACTIVATIONS, parallel), resid, p["mlp_norm"], eps)
        if is_moe:
            f, stats = moe_lib.moe(p["moe"], x, config, parallel, experts=experts)
        else:
            f, stats = swiglu(x, p["mlp"], config.official_numerics), None
    return (constrain(f, ACTIVATIONS, parallel), resid), stats, cache, iloss, idx


def _stack(stack: Params, carry, cos, sin, config: Config, *, positions, segment_ids, is_moe: bool,
           remat: str | None, cache: Latents | None, indexer_loss: str | None = None,
           selection: jax.Array | None = None, experts: jax.Array | None = None, record: bool = False,
           parallel: Parallelism | None = None):
    """The layer scan -> (carry, MoE stats, cache, indexer losses, selected keys [B, T, n, K] or None).
    selection: int32 [B, T, n_layers, K] keys to replay, layer by layer; experts: [B, T, n_layers, k] MoE
    routing to replay; record: return the keys used (and keep the routing in the stats: [B, T, n, k])."""
    fn = functools.partial(block, cos=cos, sin=sin, config=config, positions=positions,
                           segment_ids=segment_ids, is_moe=is_moe, indexer_loss=indexer_loss, parallel=parallel)
    if remat is not None:
        fn = jax.checkpoint(fn, policy=remat_policy(remat))
    # [n, B, T, K]: scanned with the layers
    sel, ex = (None if a is None else jnp.moveaxis(a, 2, 0) for a in (selection, experts))

    def keep(stats, idx):  # what is recorded; otherwise dropped here, so the scan never stacks it
        if record:
            return stats, idx
        return (None if stats is None else stats._replace(experts=None)), None

    if cache is None:
        def step(c, xs):
            p, s, e = xs
            c, stats, _, iloss, idx = fn(p, c, selection=s, experts=e)
            stats, idx = keep(stats, idx)
            return c, (stats, iloss, idx)

        carry, (stats, iloss, idx) = jax.lax.scan(step, carry, (stack, sel, ex))
        return carry, _routing_layers_last(stats), None, iloss, _layers_last(idx)

    # The stacked cache rides in the scan carry and each layer writes only its new rows into it. (As a
    # scanned input/output it would be sliced and re-stacked every call: a full copy of the cache per
    # decode step, which dominates a DSA step at long context.)
    def cached_step(c, xs):
        (h, full, i), (p, s, e) = c, xs
        h, stats, full, iloss, idx = fn(p, h, cache=full, layer=i, selection=s, experts=e)
        stats, idx = keep(stats, idx)
        return (h, full, i + 1), (stats, iloss, idx)

    (carry, cache, _), (stats, iloss, idx) = jax.lax.scan(cached_step, (carry, cache, jnp.int32(0)),
                                                          (stack, sel, ex))
    return carry, _routing_layers_last(stats), cache, iloss, _layers_last(idx)


def _layers_last(idx: jax.Array | None) -> jax.Array | None:
    return None if idx is None else jnp.moveaxis(idx, 0, 2)  # [n, B, T, K] -> [B, T, n, K]


def _routing_layers_last(stats):
    return stats if stats is None or stats.experts is None else stats._replace(experts=_layers_last(stats.experts))


def remat_policy(name: str):
    """Named rematerialisation policies for the layer scan ("full", "dots", "dots_no_batch", "none")."""
    policies = {
        "full": None,  # save nothing but the layer inputs
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "none": jax.checkpoint_policies.everything_saveable,
    }
    if name not in policies:
        raise ValueError(f"remat={name!r}: expected one of {sorted(policies)}.")
    return policies[name]


def default_positions(tokens: jax.Array) -> jax.Array:
    b, l = tokens.shape
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))


def forward_hidden(params: Params, tokens: jax.Array, config: Config, *, positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, remat: str | None = None,
                   cache: Mapping[str, Latents] | None = None, indexer_loss: str | None = None,
                   selection: Mapping[str, jax.Array] | None = None, record_selection: bool = False,
                   parallel: Parallelism | None = None) -> Aux:
    """Run the decoder stacks; returns the final-normed hidden state and routing statistics.

    tokens: int32 [B, L]; positions: int32 [B, L] (default arange; RoPE angle and causal order);
    segment_ids: int32 [B, L] for packed rows (attention and the indexer never cross segments).
    cache: optional {"dense": Latents, "moe": Latents} with leaves [L_stack, B, S_max, .]; the new tokens'
    latents are written at `positions` and attention reads the whole cache (prefill / decode).
    indexer_loss (static): "dense_warmup" or "sparse" computes the indexer KL loss of every layer
    (`dsjax.indexer_loss`; stage-1 attention is then dense) into `Aux.indexer_loss`; "dense_recall" puts
    there instead the indexer's top-k recall of the dense attention's top-k (an evaluation).
    selection: the discrete choices to replay instead of making them: keys to attend, {"dense": int32
    [B, L, n_dense, K], "moe": [B, L, n_moe, K]} (stacks whose attention is sparse), and experts to route
    to, "moe_experts": [B, L, n_moe, k]; any subset (what `Aux.selection` of an earlier forward holds: RL
    replays the rollout's; exact comparisons across layouts replay one run's choices in the other, since
    another summation order can flip a near tie). record_selection (static): return the choices made in
    `Aux.selection`.
    parallel: the run's layout (`dsjax.parallel.Parallelism`, e.g. `sharding.MeshParallelism(mesh)`):
    attention and MoE take their parallel implementations from it; None = one device.
    """
    c = config
    indexer_loss_lib.check_mode(indexer_loss, c, has_cache=cache is not None)
    positions = default_positions(tokens) if positions is None else positions.astype(jnp.int32)
    cos, sin = cos_sin(c, positions)
    h = embed(params, tokens, c)
    carry = (h, jnp.zeros_like(h))  # zero residual: layer 0's fused norm then sees h exactly
    kw = dict(positions=positions, segment_ids=segment_ids, remat=remat, indexer_loss=indexer_loss,
              record=record_selection, parallel=parallel)
    selection = dict(selection or {})
    new_cache = {} if cache is not None else None
    recorded = {}
    ilosses = []
    load = score = None
    for name, n, is_moe in (("dense", c.n_dense_layers, False), ("moe", c.n_moe_layers, True)):
        if not n:
            continue
        carry, stats, lc, il, idx = _stack(params[name], carry, cos, sin, c, is_moe=is_moe,
                                           cache=None if cache is None else cache[name],
                                           selection=selection.pop(name, None),
                                           experts=selection.pop(f"{name}_experts", None) if is_moe else None, **kw)
        ilosses.append(il)
        if idx is not None:
            recorded[name] = idx
        if is_moe:
            load, score = stats.load, stats.mean_score
            if record_selection:
                recorded[f"{name}_experts"] = stats.experts
        if cache is not None:
            new_cache[name] = lc
    if selection:
        raise ValueError(f"selection has entries {sorted(selection)} that this model has no layers for "
                         f"(expected 'dense', 'moe', 'moe_experts').")
    f, resid = carry
    with jax.named_scope("final_norm"):
        hidden, _ = add_rms_norm(f, resid, params["final_norm"], c.rms_norm_eps)
    iloss = None if indexer_loss is None else jnp.mean(jnp.concatenate(ilosses))
    return Aux(hidden, load, score, new_cache, iloss, recorded if record_selection else None)


@jax.named_scope("lm_head")
def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """Logits in true fp32 (official: fp32 head weight, fp32 matmul). hidden [..., D] -> [..., V]."""
    return dense_fp32(hidden, params["lm_head"])


def forward_with_aux(params: Params, tokens: jax.Array, config: Config, *, positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, remat: str | None = None,
                     indexer_loss: str | None = None, selection: Mapping[str, jax.Array] | None = None,
                     record_selection: bool = False,
                     parallel: Parallelism | None = None) -> tuple[jax.Array, Aux]:
    """(logits f32 [B, L, V], Aux). Pure and jittable; no input validation (see `forward`).
    indexer_loss, selection, record_selection, parallel: see `forward_hidden` (the tokens in the order the
    layout expects: for context parallelism in zig-zag order, which `sharding.forward_with_aux` handles)."""
    aux = forward_hidden(params, tokens, config, positions=positions, segment_ids=segment_ids, remat=remat,
                         indexer_loss=indexer_loss, selection=selection, record_selection=record_selection,
                         parallel=parallel)
    return constrain(lm_head(params, aux.hidden), parallel_lib.LOGITS, parallel), aux


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_jit(params, tokens, config, positions, segment_ids):
    return forward_with_aux(params, tokens, config, positions=positions, segment_ids=segment_ids)[0]


def check_tokens(tokens: Any, config: Config, *, what: str = "tokens") -> None:
    """Raise one clear ValueError for malformed token input (only when the values are concrete)."""
    if isinstance(tokens, jax.core.Tracer):
        shape = tokens.shape
    else:
        arr = np.asarray(tokens)
        shape = arr.shape
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be integer token ids, got dtype {arr.dtype}.")
        if arr.size and (arr.min() < 0 or arr.max() >= config.vocab_size):
            bad = int(arr.max()) if arr.max() >= config.vocab_size else int(arr.min())
            raise ValueError(f"{what} contain id {bad}, outside the vocabulary [0, {config.vocab_size}); "
                             "check the tokenizer matches the model.")
    if len(shape) != 2:
        raise ValueError(f"{what} must have shape [batch, length], got {tuple(shape)}.")
    if shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {shape[1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate or chunk the input.")


def forward(params: Params, tokens: Any, config: Config, *, positions: Any = None, segment_ids: Any = None,
            parallel: Parallelism | None = None) -> jax.Array:
    """Logits of a batch of token sequences.

    Args:
      params: the params pytree (`dsjax.init_params` or `checkpoints.load_hf` / `checkpoints.load`).
      tokens: int32 [B, L] token ids, each < vocab_size; L <= max_position_embeddings.
      config: the model `Config` (static).
      positions: optional int32 [B, L] positions (default 0..L-1).
      segment_ids: optional int32 [B, L] packed-document ids; attention never crosses them.
      parallel: optional layout, e.g. `sharding.MeshParallelism(mesh)`: params are placed by its rules and
        the forward runs expert- and context-parallel on it (`parallel.forward`).
    Returns:
      float32 logits [B, L, vocab_size] (sharded by the layout when `parallel` is given).
    """
    check_tokens(tokens, config)
    parallel_lib.check(parallel, config)
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if parallel is not None:
        return parallel.forward(params, tokens, config, positions=positions, segment_ids=segment_ids)
    return _forward_jit(params, tokens, config, positions, segment_ids)
