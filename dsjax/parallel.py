"""How the model runs across devices: one explicit value, passed to every forward, step and generate call.

The model never reads ambient state to decide how to parallelise. A `Parallelism` value is an argument
(static under `jax.jit`, so it is part of every compile's cache key): a function traced without one and
called with one is simply traced again, never silently reused.

This module defines only the interface the layers call:

    attend(local, q, kv, config, **visibility)   attention over latents (context parallelism)
    route_and_dispatch(x, p, config)             the routed experts of one MoE layer (expert parallelism)
    constrain(x, axes)                           a logical sharding constraint on an intermediate
    sharding(axes, shape) / param_shardings(...) where arrays live (placement of params, cache, batches)
    forward(params, tokens, config)              the whole forward on the layout (`dsjax.forward`)
    check(config)                                can this model be split over this layout

`sharding.MeshParallelism` implements it on a `jax.sharding.Mesh` (shard_map for expert and context
parallelism, the rules table for everything else). dsjax never imports `sharding`: the dependency runs
one way, sharding -> dsjax. `None` means one device: the plain local ops.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

if TYPE_CHECKING:  # annotations only: neither module is needed to define the interface
    from dsjax.config import Config
    from dsjax.latents import Latents, Queries
    from dsjax.moe import Routing

# Logical axes of the intermediates the model constrains (names the sharding rules map to mesh axes).
ACTIVATIONS = ("act_batch", "act_length", "act_embed")  # [B, T, D] residual stream
HEADS = ("act_batch", "act_length", "act_heads", None)  # [B, T, H, .] queries / attention output
TOKENS = ("act_batch", "act_length")  # [B, T]
LATENT = ("act_batch", "act_length", None)  # [B, T, kv_lora_rank | rope | index dim] per-token key state
FLAT_TOKENS = ("act_tokens", None)  # [N, D] flattened tokens (MoE dispatch in / out)
LOGITS = ("act_batch", "act_length", "act_vocab")  # [B, T, V]


class Parallelism(abc.ABC):
    """The parallel layout of a run: a hashable value (dataclass(frozen=True) in implementations)."""

    mesh: jax.sharding.Mesh

    @abc.abstractmethod
    def attend(self, local: Callable[..., Any], q: "Queries", kv: "Latents", config: "Config", *,
               q_positions: jax.Array, k_positions: jax.Array, q_segment_ids: jax.Array | None = None,
               k_segment_ids: jax.Array | None = None,
               selection: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """`local(q, kv, config, **visibility, selection=...)` (attention on one device's arrays) run over
        the layout: (o_lat [B, T, H, kv_lora_rank], selected keys int32 [B, T, index_topk] or None)."""

    @abc.abstractmethod
    def route_and_dispatch(self, x: jax.Array, p: Any, config: "Config",
                           experts: jax.Array | None = None) -> tuple[jax.Array, "Routing"]:
        """Routed experts of one MoE layer for tokens x [N, D] -> (f32 [N, D], Routing). experts: int32
        [N, k] routing to replay instead of choosing."""

    @abc.abstractmethod
    def forward(self, params: Any, tokens: Any, config: "Config", *, positions: Any = None,
                segment_ids: Any = None) -> jax.Array:
        """`dsjax.forward` on this layout: logits f32 [B, L, V] of tokens [B, L] in natural order (params
        placed first; any token reordering the layout needs, e.g. zig-zag, is its own business)."""

    @abc.abstractmethod
    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> jax.sharding.Sharding:
        """The sharding of an array with these logical axes (and shape)."""

    @abc.abstractmethod
    def param_shardings(self, config: "Config", like: Any = None) -> Any:
        """The sharding of every params leaf (FP8 {qweight, scale} pairs matched when `like` has them)."""

    @abc.abstractmethod
    def check(self, config: "Config") -> None:
        """Raise one ValueError when the model cannot be split over this layout."""

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` by logical axes (inside a traced function)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

    def place(self, tree: Any, axes: Any) -> Any:
        """Place a tree of arrays whose logical axes are `axes` (same tree, a tuple of names per leaf)."""
        return jax.tree.map(lambda a, x: put(x, self.sharding(a, np.shape(x))), axes, tree, is_leaf=_is_axes)

    def place_params(self, params: Any, config: "Config") -> Any:
        """The params placed by the rules (a no-op for arrays already there)."""
        return jax.tree.map(put, params, self.param_shardings(config, like=params))


def _is_axes(a: Any) -> bool:
    """A leaf of an axes tree: a tuple of axis names (not a NamedTuple of them, such as Latents)."""
    return isinstance(a, tuple) and all(e is None or isinstance(e, str) for e in a)


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place one array under `sharding`; works across processes (each process passes the same value)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def constrain(x: jax.Array, axes: Sequence[str | None], parallel: Parallelism | None) -> jax.Array:
    """A logical sharding constraint on `x`, or `x` itself on one device (parallel=None)."""
    return x if parallel is None else parallel.constrain(x, axes)


def check(parallel: Any, config: "Config") -> None:
    """Validate a user's `parallel=` argument: None or a `Parallelism` that can split this model."""
    if parallel is None:
        return
    if isinstance(parallel, jax.sharding.Mesh):
        raise ValueError("parallel= takes a Parallelism value, not a Mesh: pass "
                        "parallel=sharding.MeshParallelism(mesh).")
    if not isinstance(parallel, Parallelism):
        raise ValueError(f"parallel must be a dsjax.parallel.Parallelism (e.g. sharding.MeshParallelism(mesh)) "
                        f"or None, got {type(parallel).__name__}.")
    parallel.check(config)
