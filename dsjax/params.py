"""The params pytree: one table of every weight's shape, dtype, logical axes and initialiser.

Layout (kernels are [in, out]; per-layer leaves of a stack get a leading "layers" axis):

    embed [V, D]
    dense:  {attn_norm, mlp_norm, attn: {...}, mlp: {gate [D, F], up [D, F], down [F, D]}}
    moe:    {attn_norm, mlp_norm, attn: {...}, moe: {router [D, E], bias [E],
             experts: {gate [E, D, Fe], up [E, D, Fe], down [E, Fe, D]}, shared: {gate, up, down}}}
    attn:   {wq_a [D, Rq], q_norm [Rq], wq_b [Rq, H, dn+dr]   (or wq [D, H, dn+dr] when q_lora_rank is None)
             wkv_a [D, C+dr], kv_norm [C], wkv_b [C, H, dn+dv], wo [H, dv, D],
             indexer: {wq_b [Rq, Hi, Di], wk [D, Di], k_norm_scale [Di], k_norm_bias [Di], weights_proj [D, Hi]}}
    final_norm [D], lm_head [D, V]
    mtp:    {enorm [D], hnorm [D], eh_proj [2D, D], block: {one layer as above}, norm [D]}

Logical axis names are the only vocabulary `sharding/rules.py` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsjax.config import Config


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, logical axes, dtype class and initialiser."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (std = initializer_range), "ones", "zeros"
    fp32: bool = False  # kept in fp32 regardless of param_dtype (norms, router, indexer weights)

    def stacked(self, n: int, axis: str) -> "ParamSpec":
        return dataclasses.replace(self, shape=(n,) + self.shape, axes=(axis,) + self.axes)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _norm(d: int, axis: str) -> ParamSpec:
    return ParamSpec((d,), (axis,), "ones", fp32=True)


def _attn_specs(c: Config) -> dict[str, Any]:
    D, H = c.hidden_size, c.num_attention_heads
    p: dict[str, Any] = {}
    if c.q_lora_rank is None:
        p["wq"] = ParamSpec((D, H, c.qk_head_dim), ("embed", "heads", "qk_head"))
    else:
        p["wq_a"] = ParamSpec((D, c.q_lora_rank), ("embed", "q_lora"))
        p["q_norm"] = _norm(c.q_lora_rank, "q_lora")
        p["wq_b"] = ParamSpec((c.q_lora_rank, H, c.qk_head_dim), ("q_lora", "heads", "qk_head"))
    p["wkv_a"] = ParamSpec((D, c.kv_lora_rank + c.qk_rope_head_dim), ("embed", "kv_lora_rope"))
    p["kv_norm"] = _norm(c.kv_lora_rank, "kv_lora")
    p["wkv_b"] = ParamSpec((c.kv_lora_rank, H, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_head"))
    p["wo"] = ParamSpec((H, c.v_head_dim, D), ("heads", "v_head", "embed"))
    if c.has_indexer:
        Hi, Di = c.index_n_heads, c.index_head_dim
        p["indexer"] = {
            "wq_b": ParamSpec((c.q_lora_rank, Hi, Di), ("q_lora", "index_heads", "index_head")),
            "wk": ParamSpec((D, Di), ("embed", "index_head")),
            "k_norm_scale": ParamSpec((Di,), ("index_head",), "ones", fp32=True),
            "k_norm_bias": ParamSpec((Di,), ("index_head",), "zeros", fp32=True),
            "weights_proj": ParamSpec((D, Hi), ("embed", "index_heads"), fp32=True),
        }
    return p


def _mlp_specs(D: int, F: int) -> dict[str, ParamSpec]:
    return {"gate": ParamSpec((D, F), ("embed", "mlp")), "up": ParamSpec((D, F), ("embed", "mlp")),
            "down": ParamSpec((F, D), ("mlp", "embed"))}


def _moe_specs(c: Config) -> dict[str, Any]:
    D, E, F = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    p: dict[str, Any] = {
        "router": ParamSpec((D, E), ("embed", None), fp32=True),
        "bias": ParamSpec((E,), (None,), "zeros", fp32=True),
        "experts": {
            "gate": ParamSpec((E, D, F), ("exp", "embed_moe", "mlp_moe")),
            "up": ParamSpec((E, D, F), ("exp", "embed_moe", "mlp_moe")),
            "down": ParamSpec((E, F, D), ("exp", "mlp_moe", "embed_moe")),
        },
    }
    if c.n_shared_experts:
        p["shared"] = _mlp_specs(D, F * c.n_shared_experts)
    return p


def block_specs(c: Config, moe: bool) -> dict[str, Any]:
    """Specs of one decoder layer (unstacked)."""
    D = c.hidden_size
    p: dict[str, Any] = {"attn_norm": _norm(D, "embed"), "mlp_norm": _norm(D, "embed"), "attn": _attn_specs(c)}
    if moe:
        p["moe"] = _moe_specs(c)
    else:
        p["mlp"] = _mlp_specs(D, c.intermediate_size)
    return p


def param_specs(config: Config) -> dict[str, Any]:
    """The full params tree of `ParamSpec` leaves."""
    c = config
    D, V = c.hidden_size, c.vocab_size
    stack = lambda tree, n: jax.tree.map(lambda s: s.stacked(n, "layers"), tree, is_leaf=_is_spec)
    p: dict[str, Any] = {"embed": ParamSpec((V, D), ("vocab", "embed"))}
    if c.n_dense_layers:
        p["dense"] = stack(block_specs(c, moe=False), c.n_dense_layers)
    if c.n_moe_layers:
        p["moe"] = stack(block_specs(c, moe=True), c.n_moe_layers)
    p["final_norm"] = _norm(D, "embed")
    p["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    if c.num_nextn_predict_layers:
        p["mtp"] = {"enorm": _norm(D, "embed"), "hnorm": _norm(D, "embed"),
                    "eh_proj": ParamSpec((2 * D, D), ("mtp_concat", "embed")),
                    "block": block_specs(c, moe=c.mtp_is_moe), "norm": _norm(D, "embed")}
    return p


def param_dtype(spec: ParamSpec, config: Config) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if spec.fp32 else config.weight_dtype


def param_axes(config: Config) -> Any:
    """Logical axis names of every leaf (same tree as the params)."""
    return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=_is_spec)


def abstract_params(config: Config) -> Any:
    """`jax.ShapeDtypeStruct` leaves: the params' shapes without allocating them (AOT planning)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype(s, config)),
                        param_specs(config), is_leaf=_is_spec)


def init_params(config: Config, rng: jax.Array) -> Any:
    """Random parameters in the layout above (normal(0, initializer_range), ones for norms, zero biases).

    Deterministic for a given key: each leaf's key is `fold_in(rng, leaf_index)`.
    """
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

    def make(i: int, s: ParamSpec) -> jax.Array:
        dt = param_dtype(s, config)
        if s.init == "ones":
            return jnp.ones(s.shape, dt)
        if s.init == "zeros":
            return jnp.zeros(s.shape, dt)
        x = jax.random.normal(jax.random.fold_in(rng, i), s.shape, jnp.float32) * config.initializer_range
        return x.astype(dt)

    return jax.tree.unflatten(treedef, [make(i, s) for i, s in enumerate(leaves)])


def count_params(tree: Any) -> int:
    """Number of scalars in a params (or spec / abstract) tree."""
    import math

    def n(x: Any) -> int:
        return math.prod(x.shape)

    return sum(n(x) for x in jax.tree.leaves(tree, is_leaf=_is_spec))
