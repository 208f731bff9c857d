"""Where every array of a run lives: NamedShardings for params (plain or FP8), optimizer state, the KV
cache and activations, all derived from the logical axes in `dsjax.params` and the table in `rules`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.cache import axes_of
from dsjax.config import Config
from dsjax.parallel import put
from dsjax.params import ParamSpec, param_specs
from sharding.mesh import check_mesh
from sharding.rules import logical_to_spec, spec_size


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _is_fp8(x: Any) -> bool:
    return isinstance(x, Mapping) and "qweight" in x and "scale" in x


def fp8_matrix_axes(spec: ParamSpec, qshape: Sequence[int]) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """Logical axes and sizes that decide the split of an FP8 leaf's 2-D [in, out] storage.

    The leaf stores the matrix of logical shape `spec.shape` (e.g. wo [L, H, dv, D]) as
    qweight [L, H*dv, D]. A merged dimension is split like its *first* logical axis (contiguous blocks of
    H*dv are whole heads), so the returned sizes are those first axes' sizes (divisibility is checked on them).
    """
    lead = len(qshape) - 2
    shape, axes = spec.shape, spec.axes
    rest = shape[lead:]
    n_in = next((s for s in range(1, len(rest)) if math.prod(rest[:s]) == qshape[-2]), None)
    if n_in is None or math.prod(rest[n_in:]) != qshape[-1]:
        raise ValueError(f"FP8 leaf of shape {tuple(qshape)} does not store a matrix of logical shape {shape}.")
    return (tuple(axes[:lead]) + (axes[lead], axes[lead + n_in]),
            tuple(shape[:lead]) + (shape[lead], shape[lead + n_in]))


def _fp8_shardings(spec: ParamSpec, leaf: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """qweight split like its matrix; the scale grid the same way where it divides, else kept whole.

    Shards need not hold whole 128-blocks: XLA partitions the dequantisation (scale expansion, multiply)
    like any elementwise op. Expert parallelism re-splits its expert leaves on whole blocks itself.
    """
    qshape, sshape = tuple(leaf["qweight"].shape), tuple(leaf["scale"].shape)
    axes, sizes = fp8_matrix_axes(spec, qshape)
    q = logical_to_spec(axes, mesh, sizes)
    sc = [e if sshape[d] % spec_size(q, mesh, d) == 0 else None for d, e in enumerate(q)]
    while sc and sc[-1] is None:
        sc.pop()
    return {"qweight": NamedSharding(mesh, q), "scale": NamedSharding(mesh, PartitionSpec(*sc))}


def param_shardings(config: Config, mesh: Mesh, like: Any = None) -> Any:
    """NamedSharding of every params leaf on `mesh` (same tree as the params).

    like: optional params tree (arrays or `jax.ShapeDtypeStruct`) whose FP8 leaves
    {"qweight", "scale"} get matching {"qweight": ..., "scale": ...} shardings; default: plain params.
    """
    check_mesh(config, mesh)
    specs = param_specs(config)

    def one(spec: ParamSpec, leaf: Any = None):
        if leaf is not None and _is_fp8(leaf):
            return _fp8_shardings(spec, leaf, mesh)
        return NamedSharding(mesh, logical_to_spec(spec.axes, mesh, spec.shape))

    if like is None:
        return jax.tree.map(one, specs, is_leaf=_is_spec)
    return jax.tree.map(one, specs, like, is_leaf=_is_spec)


def shard_params(params: Any, config: Config, mesh: Mesh) -> Any:
    """The params placed on `mesh` by the rules (FP8 leaves included)."""
    shardings = param_shardings(config, mesh, like=params)
    return jax.tree.map(put, params, shardings)


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """Shardings of a KV cache (`dsjax.cache.init_cache`: latents [L, B, S_max, dim], MTP latents
    [B, S_max, dim], lengths [B]; arrays or shapes), by the logical axes of `dsjax.cache.axes_of`."""
    return jax.tree.map(lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, mesh, x.shape)), cache,
                        axes_of(cache))


def _dict_path(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(opt_state: Any, config: Config, mesh: Mesh, params: Any = None) -> Any:
    """Shardings of an optimizer state (arrays or `jax.eval_shape` output) that mirror the params'.

    Optax keeps per-parameter moments as trees shaped like the params (dict keys = params paths): such
    a leaf takes its parameter's sharding; anything else (step counts, scalars) is replicated.
    """
    ps = param_shardings(config, mesh, like=params)
    shapes = params if params is not None else jax.tree.map(lambda s: s, param_specs(config), is_leaf=_is_spec)
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, s), leaf in zip(jax.tree_util.tree_flatten_with_path(ps)[0], jax.tree.leaves(shapes, is_leaf=_is_spec)):
        by_path[_dict_path(path)] = (tuple(leaf.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        hit = by_path.get(_dict_path(path))
        if hit is not None and hit[0] == tuple(np.shape(leaf)):
            return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)
