"""Restore a dsjax Orbax checkpoint straight into its target sharding, and save params as one.

    config, params = checkpoints.load(ckpt_dir, parallel=None, dtype=None)   # model_dir.load -> load_converted
    checkpoints.save(ckpt_dir, params, config)

With a layout (`parallel=sharding.MeshParallelism(mesh)`), each array is restored directly into its
NamedSharding: Orbax reads, on every host, only the chunks of that host's shards. Shardings come from the
layout's rules (`parallel.param_shardings(config)`); an explicit `shardings` tree (same structure as the
params) overrides them.

FP8 leaves ({"qweight" [..., in, out], "scale" [..., in/128, out/128]}, see `layers.weight`) get their
shardings from the leaf's: stacked axes as given, the 2-D matrix axes from the logical in / out axes
when that is expressible, and the small scale grid replicated along its matrix axes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from checkpoints import orbax_io
from checkpoints.hf_names import hf_table
from checkpoints.safetensors_io import CheckpointError
from dsjax import fp8, parallel as parallel_lib
from dsjax.config import Config
from dsjax.parallel import Parallelism
from dsjax.params import ParamSpec, param_dtype, param_specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def config_from_marker(marker: Mapping[str, Any], dtype: Any = None) -> Config:
    """The model Config recorded in a checkpoint; `dtype` (if given) becomes its param and compute dtype."""
    name = np.dtype(dtype).name if dtype is not None else marker["param_dtype"]
    return Config.from_hf(marker["hf_config"], dtype=name, param_dtype=name,
                          fp8_weight_block=marker.get("fp8_block") if marker.get("fp8_leaves") else None)


def _matrix_layout(config: Config) -> dict[tuple[str, ...], tuple[int, int]]:
    """Leaf path -> (number of stacked layer / expert axes, number of leading logical "in" dims)."""
    return {t.path: ((t.layer is not None) + (t.expert is not None), t.n_in) for t in hf_table(config).values()}


def _fp8_shapes(s: ParamSpec, k: int, n_in: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored shapes of an FP8 leaf with k stacked axes: qweight [*stack, in, out], scale [*stack, in/b, out/b]."""
    m = s.shape[k:]
    i, o = math.prod(m[:n_in]), math.prod(m[n_in:])
    b = fp8.BLOCK
    return {"qweight": (s.shape[:k] + (i, o), np.dtype(fp8.E4M3)),
            "scale": (s.shape[:k] + (-(-i // b), -(-o // b)), np.dtype(np.float32))}


def _fp8_shardings(sh: Any, s: ParamSpec, k: int, n_in: int) -> dict[str, Any]:
    """Shardings of an FP8 leaf's qweight and scale from the sharding of its logical leaf."""
    if not isinstance(sh, NamedSharding):
        if sh.is_fully_replicated:
            return {"qweight": sh, "scale": sh}
        raise CheckpointError(f"cannot derive FP8 shardings from {sh}; pass NamedShardings or FP8 pairs.")
    mesh_shape = dict(sh.mesh.shape)
    spec = tuple(sh.spec) + (None,) * (len(s.shape) - len(sh.spec))
    m = s.shape[k:]
    q_shape = _fp8_shapes(s, k, n_in)["qweight"][0]

    def flat_axis(dims: range, size: int) -> Any:
        # A flattened group shards like its leading dim if only that dim is sharded (rows stay contiguous).
        axes = spec[k + dims.start]
        if axes is None or any(spec[k + d] is not None for d in dims[1:]):
            return None
        n = math.prod(mesh_shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        return axes if size % n == 0 else None

    q_spec = spec[:k] + (flat_axis(range(0, n_in), q_shape[k]), flat_axis(range(n_in, len(m)), q_shape[k + 1]))
    return {"qweight": NamedSharding(sh.mesh, PartitionSpec(*q_spec)),
            "scale": NamedSharding(sh.mesh, PartitionSpec(*spec[:k], None, None))}


def _default_shardings(config: Config, parallel: Parallelism | None) -> Any:
    if parallel is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: dev, param_specs(config), is_leaf=_is_spec)
    parallel_lib.check(parallel, config)
    return parallel.param_shardings(config)


def abstract_checkpoint(config: Config, fp8_leaves: list[str], shardings: Any = None) -> Any:
    """jax.ShapeDtypeStruct per stored array (with its sharding, if `shardings` is given): what `load`
    restores into. FP8 leaves are {"qweight", "scale"} pairs."""
    layout = _matrix_layout(config)
    fp8_set = set(fp8_leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=_is_spec)
    sh_flat = [None] * len(flat) if shardings is None else treedef.flatten_up_to(shardings)
    out = []
    for (path, s), sh in zip(flat, sh_flat):
        p = tuple(key.key for key in path)
        if orbax_io.leaf_name(p) in fp8_set:
            k, n_in = layout[p]
            shapes = _fp8_shapes(s, k, n_in)
            if sh is not None and not (isinstance(sh, Mapping) and set(sh) == {"qweight", "scale"}):
                sh = _fp8_shardings(sh, s, k, n_in)
            out.append({n: jax.ShapeDtypeStruct(*shapes[n], sharding=None if sh is None else sh[n])
                        for n in shapes})
        else:
            out.append(jax.ShapeDtypeStruct(s.shape, param_dtype(s, config), sharding=sh))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_stored(ckpt_dir: str, abstract: Any) -> None:
    """One clear error listing every array the checkpoint lacks, has extra, or holds in another shape."""
    stored = orbax_io.stored_shapes(ckpt_dir)
    want = {orbax_io.leaf_name(p): tuple(v.shape) for p, v in orbax_io.tree_paths(abstract)}
    problems = [f"missing: {n}" for n in sorted(set(want) - set(stored))]
    problems += [f"unexpected: {n}" for n in sorted(set(stored) - set(want))]
    problems += [f"{n}: stored {list(stored[n][0])}, config expects {list(want[n])}"
                 for n in sorted(set(want) & set(stored)) if stored[n][0] != want[n]]
    if problems:
        raise CheckpointError(f"{ckpt_dir} does not match the config recorded in it ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))


def load_converted(ckpt_dir: str | os.PathLike, parallel: Parallelism | None = None, dtype: Any = None, *,
                   shardings: Any = None) -> tuple[Config, Any]:
    """Restore a converted dsjax checkpoint (`python -m checkpoints.convert` or `save`) -> (config, params).
    `checkpoints.load` (model_dir.py) calls it for that kind of directory.

    parallel: a layout (`sharding.MeshParallelism(mesh)`); arrays are restored directly into their shardings
      on it (see module doc).
    dtype: cast the large matrices to this dtype while restoring (default: as stored). Norms, router,
      bias and indexer weights stay fp32; FP8 leaves stay FP8.
    shardings: explicit params-shaped tree of shardings (overrides `parallel`); an FP8 leaf's entry may be
      one sharding (derived for qweight / scale) or a {"qweight", "scale"} pair.
    Raises CheckpointError for an incomplete, foreign or mismatching directory.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    marker = orbax_io.read_marker(ckpt_dir)
    config = config_from_marker(marker, dtype)
    if shardings is None:
        shardings = _default_shardings(config, parallel)
    fp8_leaves = marker.get("fp8_leaves", [])
    abstract = abstract_checkpoint(config, fp8_leaves, shardings)
    _check_stored(ckpt_dir, abstract)
    # Restored as stored, so that every array can be checked against its checksum, then cast leaf by leaf.
    stored = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, s.dtype, sharding=a.sharding), abstract,
                          abstract_checkpoint(config_from_marker(marker), fp8_leaves))
    params = orbax_io.restore(ckpt_dir, stored)
    orbax_io.check_arrays(ckpt_dir, marker, {orbax_io.leaf_name(p): x for p, x in orbax_io.tree_paths(params)})
    return config, jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), params, abstract)


def save(ckpt_dir: str | os.PathLike, params: Any, config: Config, *, overwrite: bool = False) -> None:
    """Save params (e.g. fine-tuned; sharded and multi-host is fine) as a dsjax checkpoint `load` and
    `python -m checkpoints.export` read. Atomic: the directory appears only once complete.
    """
    fp8_leaves, hf_dtypes = [], {}
    is_pair = lambda x: isinstance(x, Mapping) and "qweight" in x  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_pair)[0]
    for path, v in flat:
        name = orbax_io.leaf_name([k.key for k in path])
        if isinstance(v, Mapping):
            fp8_leaves.append(name)
            hf_dtypes[name] = np.dtype(fp8.E4M3).name
        else:
            hf_dtypes[name] = np.dtype(v.dtype).name
    expected = abstract_checkpoint(config, fp8_leaves)
    if (jax.tree.structure(params) != jax.tree.structure(expected)
            or [x.shape for x in jax.tree.leaves(params)] != [x.shape for x in jax.tree.leaves(expected)]):
        raise CheckpointError("params do not match param_specs(config) (tree or shapes differ); "
                              "save the params of this config.")
    bad = [f"{orbax_io.leaf_name([k.key for k in p])}: {x.dtype}, config says {y.dtype}"
           for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected))
           if x.dtype != y.dtype]
    if bad:
        raise CheckpointError(f"params dtypes differ from the config's ({len(bad)}), e.g. {bad[:3]}; save with "
                              "config.replace(param_dtype=...) matching the params, or cast them first.")
    marker = {"format": orbax_io.FORMAT, "hf_config": config.to_hf(), "param_dtype": config.param_dtype,
              "fp8_leaves": fp8_leaves, "fp8_block": fp8.BLOCK if fp8_leaves else None, "hf_dtypes": hf_dtypes,
              "written_by": "checkpoints.save"}
    orbax_io.write_arrays(ckpt_dir, params, marker, overwrite=overwrite)
