"""Running the model on a mesh: `MeshParallelism`, dsjax's `Parallelism` interface on a `jax.sharding.Mesh`.

The model receives this value as an argument (`dsjax.forward(..., parallel=p)`, `model.forward_hidden`,
the train step, `dsjax.generate`): attention runs context-parallel (`context_parallel.make_attend`), the
routed experts expert-parallel (`expert_parallel.make_dispatch`), intermediates are constrained by the one
rules table, and arrays are placed by it. Everything else is partitioned by XLA (GSPMD) from the params'
and inputs' shardings. The value is a frozen dataclass, so it is hashable and jit keys on it: a function
traced for one layout is never reused for another, or for none.

    p = sharding.MeshParallelism(sharding.make_mesh(expert=8, config=config))
    logits = dsjax.forward(params, tokens, config, parallel=p)

`forward_with_aux` adds the zig-zag token order of context parallelism; `sharded_forward` is what
`dsjax.forward(..., parallel=p)` calls. Training and inference code compose the same pieces: place params
with `shard_params` (or restore them into `param_shardings`), then pass the value to any dsjax function
inside their jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dsjax import model
from dsjax.config import Config
from dsjax.latents import Latents, Queries
from dsjax.moe import Routing
from dsjax.parallel import Parallelism
from sharding.context_parallel import SEQUENCE_AXIS, make_attend, zigzag_order
from sharding.expert_parallel import DEFAULT_BUFFER_BYTES, IMPLS, make_dispatch
from sharding.mesh import axis_size, check_mesh, mesh_from_spec
from sharding.placement import param_shardings, put, shard_params
from sharding.rules import LOGITS_AXES, TOKEN_AXES, logical_to_sharding

@dataclasses.dataclass(frozen=True)
class MeshParallelism(Parallelism):
    """Expert, context, FSDP, tensor and data parallelism over `mesh` (axes of `rules.MESH_AXES`).

    ep_impl: the expert all-to-all, "ragged" | "padded" | "emulated" (None: by the lowering platform, see
      expert_parallel.make_dispatch).
    ep_buffer_bytes: bound on the all-to-all's worst-case receive buffer (tokens go in chunks).
    zigzag: self-attention tokens are in `context_parallel.zigzag_order` (set by `forward_with_aux`, which
      permutes them); the gathered keys are put back in natural order before the top-k.
    """

    mesh: Mesh
    ep_impl: str | None = None
    ep_buffer_bytes: int = DEFAULT_BUFFER_BYTES
    zigzag: bool = False

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"MeshParallelism(mesh=...) takes a jax.sharding.Mesh (sharding.make_mesh), got "
                            f"{type(self.mesh).__name__}.")
        if self.ep_impl is not None and self.ep_impl not in IMPLS:
            raise ValueError(f"ep_impl={self.ep_impl!r}: expected one of {IMPLS} or None.")
        if self.ep_buffer_bytes < 1:
            raise ValueError(f"ep_buffer_bytes={self.ep_buffer_bytes} must be positive.")

    # --------------------------------------------------------------------------- the model's calls
    def attend(self, local: Callable[..., Any], q: Queries, kv: Latents, config: Config,
               **vis) -> tuple[jax.Array, jax.Array | None]:
        order = zigzag_order(kv.kv.shape[1], axis_size(self.mesh, SEQUENCE_AXIS)) if self.zigzag else None
        return make_attend(self.mesh, order)(local, q, kv, config, **vis)

    def route_and_dispatch(self, x: jax.Array, p: Any, config: Config,
                           experts: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        return make_dispatch(self.mesh, self.ep_impl, self.ep_buffer_bytes)(x, p, config, experts)

    # --------------------------------------------------------------------------- placement
    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return logical_to_sharding(axes, self.mesh, shape)

    def param_shardings(self, config: Config, like: Any = None) -> Any:
        return param_shardings(config, self.mesh, like)

    def check(self, config: Config) -> None:
        check_mesh(config, self.mesh)

    def forward(self, params: Any, tokens: Any, config: Config, *, positions: Any = None,
                segment_ids: Any = None) -> jax.Array:
        return sharded_forward(params, tokens, config, self, positions=positions, segment_ids=segment_ids)


def as_parallelism(layout: Mesh | MeshParallelism, **options: Any) -> MeshParallelism:
    """A `MeshParallelism` from a mesh (with `options`) or itself (options then replace its fields)."""
    if isinstance(layout, MeshParallelism):
        return dataclasses.replace(layout, **options) if options else layout
    return MeshParallelism(layout, **options)


def parallelism_from_spec(text: str | None, *, config: Config | None = None) -> MeshParallelism | None:
    """The layout of a --mesh flag ("expert=8,tensor=2"): `MeshParallelism` over `mesh_from_spec`; None for
    an empty spec (one device). ValueError as `mesh_from_spec`."""
    mesh = mesh_from_spec(text, config=config)
    return None if mesh is None else MeshParallelism(mesh)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh) -> jax.Array:
    """`with_sharding_constraint` by logical axes (inside jit)."""
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(axes, mesh, x.shape))


def forward_with_aux(params: Any, tokens: jax.Array, config: Config, layout: Mesh | MeshParallelism, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     remat: str | None = None, zigzag: bool = True, selection: Any = None,
                     record_selection: bool = False, **options: Any) -> tuple[jax.Array, model.Aux]:
    """`dsjax.forward_with_aux` on a mesh (traceable; call it inside jit / grad).

    layout: a Mesh or a `MeshParallelism` (options: its fields, e.g. ep_impl="padded").
    tokens, positions, segment_ids: int32 [B, L] in natural order. With `sequence` > 1 (and L a multiple
    of 2·sequence) the tokens run in zig-zag order and the outputs are put back in natural order.
    selection, record_selection: as in `dsjax.model.forward_hidden` (selected keys in natural order too).
    Returns (logits f32 [B, L, V], Aux with hidden [B, L, D] (and the selection) in natural order).
    """
    par = as_parallelism(layout, **options)
    mesh = par.mesh
    b, t = tokens.shape
    positions = model.default_positions(tokens) if positions is None else positions.astype(jnp.int32)
    order = zigzag_order(t, axis_size(mesh, SEQUENCE_AXIS)) if zigzag else None
    if order is not None:
        tokens, positions = tokens[:, order], positions[:, order]
        segment_ids = None if segment_ids is None else segment_ids[:, order]
        selection = None if selection is None else jax.tree.map(lambda a: a[:, order], dict(selection))
    tokens, positions = constrain(tokens, TOKEN_AXES, mesh), constrain(positions, TOKEN_AXES, mesh)
    if segment_ids is not None:
        segment_ids = constrain(segment_ids, TOKEN_AXES, mesh)
    logits, aux = model.forward_with_aux(params, tokens, config, positions=positions, segment_ids=segment_ids,
                                         remat=remat, selection=selection, record_selection=record_selection,
                                         parallel=dataclasses.replace(par, zigzag=order is not None))
    if order is not None:
        inverse = np.argsort(order)
        logits = logits[:, inverse]
        aux = aux._replace(hidden=aux.hidden[:, inverse],
                           selection=None if aux.selection is None else {k: v[:, inverse]
                                                                         for k, v in aux.selection.items()})
    return constrain(logits, LOGITS_AXES, mesh), aux


@functools.partial(jax.jit, static_argnames=("config", "par"))
def _sharded_logits(params, tokens, positions, segment_ids, selection, config, par):
    return forward_with_aux(params, tokens, config, par, positions=positions, segment_ids=segment_ids,
                            selection=selection)[0]


def sharded_forward(params: Any, tokens: Any, config: Config, layout: Mesh | MeshParallelism, *,
                    positions: Any = None, segment_ids: Any = None, selection: Any = None,
                    **options: Any) -> jax.Array:
    """Logits f32 [B, L, V] of tokens int32 [B, L], computed on a mesh (what `dsjax.forward(parallel=...)`
    calls). layout: a Mesh or a `MeshParallelism` (options: its fields). selection: discrete choices to
    replay (`dsjax.model.forward_hidden`), leaves [B, L, ...].

    Params not yet placed by the rules are placed first (`shard_params`; a no-op when they are).
    The logits come back sharded: batch over (data, fsdp, expert), length over sequence, vocab over tensor.
    """
    par = as_parallelism(layout, **options)
    mesh = par.mesh
    check_mesh(config, mesh)
    params = shard_params(params, config, mesh)
    tokens = jnp.asarray(tokens, jnp.int32) if jax.process_count() == 1 else np.asarray(tokens, np.int32)
    tok = logical_to_sharding(TOKEN_AXES, mesh, tokens.shape)
    def place(a):
        if a is None:
            return None
        a = a if jax.process_count() > 1 else jnp.asarray(a, jnp.int32)
        return put(a, tok if a.ndim == 2 else logical_to_sharding(TOKEN_AXES + (None,) * (a.ndim - 2), mesh, a.shape))

    sel = None if selection is None else {k: place(v) for k, v in selection.items()}
    return _sharded_logits(params, put(tokens, tok), place(positions), place(segment_ids), sel, config, par)
