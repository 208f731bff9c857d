"""Running the model on a mesh.

`parallel(mesh)` is a context manager for use *inside* a traced (jitted) function: while it is active,
`dsjax.moe` dispatches the routed experts expert-parallel (expert_parallel.make_dispatch) and
`dsjax.attention.attend` runs sequence-parallel (context_parallel.make_attend); everything else is
partitioned by XLA (GSPMD) from the params' and inputs' shardings. `forward_with_aux` adds the zig-zag
token order and the sharding constraints; `sharded_forward` is what `dsjax.forward(..., mesh=mesh)` calls.

Training and inference code compose the same pieces: put params with `shard_params` (or restore them into
`param_shardings`), then inside their jitted step call `sharding.forward_with_aux` (or any dsjax function
under `with sharding.parallel(mesh):`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsjax import attention, model
from dsjax import moe as moe_lib
from dsjax.config import Config
from sharding.context_parallel import SEQUENCE_AXIS, make_attend, zigzag_order
from sharding.expert_parallel import DEFAULT_BUFFER_BYTES, make_dispatch
from sharding.mesh import axis_size, check_mesh
from sharding.placement import put, shard_params
from sharding.rules import LOGITS_AXES, TOKEN_AXES, logical_to_sharding


@contextlib.contextmanager
def parallel(mesh: Mesh, *, key_order: np.ndarray | None = None, ep_impl: str | None = None,
             ep_buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Iterator[None]:
    """While tracing inside this context, MoE layers run expert-parallel and attention context-parallel.

    key_order: set when the tokens were permuted by `context_parallel.zigzag_order` (see forward_with_aux).
    ep_impl: "ragged" | "padded" | "emulated" (default: by backend, see expert_parallel).
    ep_buffer_bytes: bound on the expert all-to-all's worst-case receive buffer (tokens go in chunks).
    """
    t1 = moe_lib.DISPATCH_HOOK.set(make_dispatch(mesh, ep_impl, ep_buffer_bytes))
    t2 = attention.ATTEND_HOOK.set(make_attend(mesh, key_order))
    try:
        yield
    finally:
        attention.ATTEND_HOOK.reset(t2)
        moe_lib.DISPATCH_HOOK.reset(t1)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh) -> jax.Array:
    """`with_sharding_constraint` by logical axes (inside jit)."""
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(axes, mesh, x.shape))


def forward_with_aux(params: Any, tokens: jax.Array, config: Config, mesh: Mesh, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     remat: str | None = None, ep_impl: str | None = None,
                     ep_buffer_bytes: int = DEFAULT_BUFFER_BYTES, zigzag: bool = True) -> tuple[jax.Array, model.Aux]:
    """`dsjax.forward_with_aux` on `mesh` (traceable; call it inside jit / grad).

    tokens, positions, segment_ids: int32 [B, L] in natural order. With `sequence` > 1 (and L a multiple
    of 2·sequence) the tokens run in zig-zag order and the outputs are put back in natural order.
    Returns (logits f32 [B, L, V], Aux with hidden [B, L, D] in natural order).
    """
    b, t = tokens.shape
    positions = model.default_positions(tokens) if positions is None else positions.astype(jnp.int32)
    order = zigzag_order(t, axis_size(mesh, SEQUENCE_AXIS)) if zigzag else None
    if order is not None:
        tokens, positions = tokens[:, order], positions[:, order]
        segment_ids = None if segment_ids is None else segment_ids[:, order]
    tokens, positions = constrain(tokens, TOKEN_AXES, mesh), constrain(positions, TOKEN_AXES, mesh)
    if segment_ids is not None:
        segment_ids = constrain(segment_ids, TOKEN_AXES, mesh)
    with parallel(mesh, key_order=order, ep_impl=ep_impl, ep_buffer_bytes=ep_buffer_bytes):
        logits, aux = model.forward_with_aux(params, tokens, config, positions=positions,
                                             segment_ids=segment_ids, remat=remat)
    if order is not None:
        inverse = np.argsort(order)
        logits = logits[:, inverse]
        aux = aux._replace(hidden=aux.hidden[:, inverse])
    return constrain(logits, LOGITS_AXES, mesh), aux


@functools.partial(jax.jit, static_argnames=("config", "mesh", "ep_impl"))
def _sharded_logits(params, tokens, positions, segment_ids, config, mesh, ep_impl):
    return forward_with_aux(params, tokens, config, mesh, positions=positions, segment_ids=segment_ids,
                            ep_impl=ep_impl)[0]


def sharded_forward(params: Any, tokens: Any, config: Config, mesh: Mesh, *, positions: Any = None,
                    segment_ids: Any = None, ep_impl: str | None = None) -> jax.Array:
    """Logits f32 [B, L, V] of tokens int32 [B, L], computed on `mesh` (called by `dsjax.forward(mesh=...)`).

    Params not yet placed by the rules are placed first (`shard_params`; a no-op when they are).
    The logits come back sharded: batch over (data, fsdp, expert), length over sequence, vocab over tensor.
    """
    check_mesh(config, mesh)
    params = shard_params(params, config, mesh)
    tokens = jnp.asarray(tokens, jnp.int32) if jax.process_count() == 1 else np.asarray(tokens, np.int32)
    tok = logical_to_sharding(TOKEN_AXES, mesh, tokens.shape)
    place = lambda a: None if a is None else put(a if jax.process_count() > 1 else jnp.asarray(a, jnp.int32), tok)
    return _sharded_logits(params, put(tokens, tok), place(positions), place(segment_ids), config, mesh, ep_impl)
