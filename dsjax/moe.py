"""DeepSeekMoE: the sigmoid gate with group-limited routing, and dropless expert dispatch (spec §6.2).

route():     scores s = sigmoid(x·W_g) in fp32; the correction bias is added only to *choose* experts
             (group score = sum of the top-2 biased scores per group, keep `topk_group` groups, then the
             top `num_experts_per_tok` experts); the combine weights are the *unbiased* s of the chosen
             experts, renormalised to sum 1 and scaled by `routed_scaling_factor`.
dispatch():  dropless: the (token, slot) pairs are sorted by expert and run through grouped matmuls
             (`jax.lax.ragged_dot`, or a blocked scan on CPU where ragged_dot lowers to a dense E-fold
             masked matmul); the weighted expert outputs are summed back per token in fp32.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.layers import dense_fp32, is_fp8, quantize_activations, swiglu, weight
from dsjax.parallel import FLAT_TOKENS, Parallelism, constrain


class Routing(NamedTuple):
    weights: jax.Array  # f32 [N, k] combine weights (unbiased, normalised, scaled)
    experts: jax.Array  # int32 [N, k] chosen expert ids
    scores: jax.Array  # f32 [N, E] unbiased sigmoid affinities (for balance losses)


def route(x: jax.Array, router: jax.Array, bias: jax.Array, config: Config,
          experts: jax.Array | None = None) -> Routing:
    """Choose experts for tokens x [N, D] with router [D, E] (fp32) and correction bias [E].
    experts: int32 [N, k] to use instead of choosing (replay of an earlier forward's routing); the
    combine weights are still this forward's scores of those experts."""
    c = config
    n = x.shape[0]
    e, g = c.n_routed_experts, c.n_group
    scores = jax.nn.sigmoid(dense_fp32(x, router))
    if experts is not None:
        return _weights(scores, experts.astype(jnp.int32), c)
    biased = scores + bias.astype(jnp.float32)
    if g > 1:
        grouped = biased.reshape(n, g, e // g)
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, G]
        _, keep = jax.lax.top_k(group_score, c.topk_group)
        group_mask = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], keep].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // g, axis=1), biased, -jnp.inf)
    _, experts = jax.lax.top_k(biased, c.num_experts_per_tok)
    return _weights(scores, experts.astype(jnp.int32), c)


def _weights(scores: jax.Array, experts: jax.Array, c: Config) -> Routing:
    w = jnp.take_along_axis(scores, experts, axis=-1)
    if c.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return Routing(w * c.routed_scaling_factor, experts, scores)


def _grouped_matmul_blocked(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    """Grouped matmul by a scan over (row block, expert) tiles; FLOPs ~ (M + E·block)·D·F.

    x: [M, D] rows sorted by group; w: [E, D, F]; group_sizes: [E] summing to M. Returns f32 [M, F].
    Each tile multiplies one row block by one expert's weight and keeps only that expert's rows; there
    are at most ceil(M/block) + E - 1 non-empty tiles (a static bound).
    """
    m, d = x.shape
    e, _, f = w.shape
    block = max(1, min(block, m))
    nb = -(-m // block)
    xp = jnp.pad(x, ((0, nb * block - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // block
    last = jnp.maximum(ends - 1, 0) // block
    ntiles = jnp.where(group_sizes > 0, last - first + 1, 0)
    tile_end = jnp.cumsum(ntiles)
    n_static = nb + e - 1

    def step(out, t):
        ex = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), e - 1)
        blk = first[ex] + t - (tile_end[ex] - ntiles[ex])
        live = t < tile_end[-1]
        blk = jnp.where(live, blk, 0)
        rows = blk * block + jnp.arange(block)
        keep = live & (rows >= starts[ex]) & (rows < ends[ex])
        xb = jax.lax.dynamic_slice_in_dim(xp, blk * block, block)
        yb = jnp.dot(xb, w[ex].astype(x.dtype), preferred_element_type=jnp.float32, precision=_precision(x))
        cur = jax.lax.dynamic_slice_in_dim(out, blk * block, block)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(keep[:, None], yb, 0.0),
                                                   blk * block, 0), None

    out, _ = jax.lax.scan(step, jnp.zeros((nb * block, f), jnp.float32), jnp.arange(n_static))
    return out[:m]


def _precision(x: jax.Array):
    """f32 operands (official numerics' dequantised FP8) multiply in true f32, never in bf16 passes."""
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, config: Config) -> jax.Array:
    """Rows of x [M, D] (sorted by group) times their group's w [E, D, F] -> f32 [M, F]."""
    def blocked(x, w, group_sizes):
        return _grouped_matmul_blocked(x, w, group_sizes, config.moe_block_size)

    def ragged(x, w, group_sizes):
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32,
                                  precision=_precision(x))

    impl = config.moe_impl
    if impl == "auto":
        # By the default device, not the lowering platform (lax.platform_dependent would trace ragged_dot on CPU
        # too, and ragged_dot has no batching rule for jacrev / vmap): an AOT compile for TPU from a CPU host
        # names moe_impl="ragged_dot" (experiments/plan.py --topology, experiments/tpu_compile.py do).
        impl = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return (blocked if impl == "blocked" else ragged)(x, w, group_sizes)


@jax.named_scope("experts")
def experts_ffn(x_sorted: jax.Array, experts: Mapping[str, Any], group_sizes: jax.Array,
                config: Config, *, out_dtype: Any = None, fp8_acts: bool | None = None) -> jax.Array:
    """SwiGLU of every row through its own expert. x_sorted [M, D] -> [M, D] (out_dtype, default x dtype).

    Rows past sum(group_sizes) come out as zeros. `out_dtype=float32` keeps the down projection
    unrounded (expert parallelism sums tensor-parallel partial products before rounding).
    Official numerics (`config.official_numerics`): gate/up outputs are rounded to the compute dtype before
    the SwiGLU product, as the official `Expert` does, and with FP8 expert weights (`fp8_acts`; default:
    whether `experts` are FP8 storage, which expert parallelism has already dequantised) the inputs of
    gate/up and of down are activation-quantised (`layers.quantize_activations`) as the FP8 GEMM does.
    """
    c = config
    d, f = c.hidden_size, c.moe_intermediate_size
    dt = x_sorted.dtype
    quant = c.official_numerics and (is_fp8(experts["gate"]) if fp8_acts is None else fp8_acts)
    wdt = jnp.float32 if quant else dt  # the FP8 GEMM: exact dequantised operands, fp32 products
    wg = weight(experts["gate"], (d, f), wdt)
    wu = weight(experts["up"], (d, f), wdt)
    wd = weight(experts["down"], (f, d), wdt)
    xin = quantize_activations(x_sorted) if quant else x_sorted
    g = grouped_matmul(xin, wg, group_sizes, c)
    u = grouped_matmul(xin, wu, group_sizes, c)
    if c.official_numerics:  # w1(x), w3(x) are bf16 linears' outputs in the official Expert
        g, u = g.astype(dt).astype(jnp.float32), u.astype(dt).astype(jnp.float32)
    z = (jax.nn.silu(g) * u).astype(dt)
    return grouped_matmul(quantize_activations(z) if quant else z, wd, group_sizes, c).astype(out_dtype or dt)


def dispatch(x: jax.Array, r: Routing, experts: Mapping[str, Any], config: Config) -> jax.Array:
    """Dropless routed-expert output for tokens x [N, D] -> f32 [N, D] (weighted sum over the k slots)."""
    n, d = x.shape
    k = r.experts.shape[1]
    flat = r.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=config.n_routed_experts).astype(jnp.int32)
    y = experts_ffn(x[order // k], experts, group_sizes, config)
    y = jnp.zeros((n * k, d), y.dtype).at[order].set(y)  # back to (token, slot) order
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, d).astype(jnp.float32), r.weights)


class MoEStats(NamedTuple):
    """Per-layer routing statistics for balancing losses and the aux-loss-free bias update."""

    load: jax.Array  # f32 [B, E]: per sequence, fraction of its T·k routed slots sent to each expert
    mean_score: jax.Array  # f32 [B, E]: per sequence, mean normalised affinity s'_i (balance loss P_i)
    experts: jax.Array | None = None  # int32 [B, T, k]: the chosen experts (what `moe(experts=...)` replays)


def moe(p: Mapping[str, Any], x: jax.Array, config: Config, parallel: Parallelism | None = None,
        experts: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
    """Shared expert + routed experts. x: [B, T, D] -> ([B, T, D], stats).

    parallel: the run's layout; its `route_and_dispatch` runs the routed experts (expert parallelism).
    None: local `route` + `dispatch` on one device. experts: int32 [B, T, k] routing to replay (RL's
    keep-routing: `MoEStats.experts` of an earlier forward) instead of choosing.
    """
    b, t, d = x.shape
    xf = constrain(x.reshape(b * t, d), FLAT_TOKENS, parallel)
    ef = None if experts is None else constrain(experts.reshape(b * t, -1), FLAT_TOKENS, parallel)
    if parallel is not None:
        with jax.named_scope("moe_dispatch"):
            y, r = parallel.route_and_dispatch(xf, p, config, experts=ef)
    else:
        with jax.named_scope("moe_route"):
            r = route(xf, p["router"], p["bias"], config, ef)
        with jax.named_scope("moe_dispatch"):
            y = dispatch(xf, r, p["experts"], config)
    y = constrain(y, FLAT_TOKENS, parallel)
    if "shared" in p:
        with jax.named_scope("shared_expert"):
            y = y + swiglu(xf, p["shared"], config.official_numerics).astype(jnp.float32)
    e = config.n_routed_experts
    counts = jax.vmap(lambda ids: jnp.bincount(ids, length=e))(r.experts.reshape(b, -1)).astype(jnp.float32)
    norm_scores = (r.scores / jnp.sum(r.scores, axis=-1, keepdims=True)).reshape(b, t, e)
    stats = MoEStats(counts / (t * r.experts.shape[1]), jnp.mean(norm_scores, axis=1), r.experts.reshape(b, t, -1))
    return y.astype(x.dtype).reshape(b, t, d), stats
