"""Building the device mesh and checking that a model config can be split over it.

The mesh always has the five axes of `rules.MESH_AXES` (size 1 where unused), so every rule and every
`shard_map` spec can name them. Meshes use `AxisType.Auto` (GSPMD propagation outside the explicit
`shard_map` regions of expert and context parallelism).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from dsjax.config import Config
from sharding.rules import MESH_AXES


def parse_mesh_sizes(text: str) -> dict[str, int]:
    """Axis sizes from a command-line mesh spec such as "expert=8,tensor=2" (the scripts' --mesh flag).

    Raises one ValueError naming the bad part and the valid axes."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.partition("=")
        name = name.strip()
        if not n.strip().isdigit():
            why = "is not axis=size"
        elif name not in MESH_AXES:
            why = "names an unknown axis"
        elif name in sizes:
            why = "is repeated"
        else:
            sizes[name] = int(n)
            continue
        raise ValueError(f"mesh spec {text!r}: {part!r} {why}; write axis=size pairs over the axes "
                         f"{', '.join(MESH_AXES)}, e.g. expert=8,tensor=2.")
    return sizes


def mesh_from_spec(text: str | None, *, config: Config | None = None) -> Mesh | None:
    """`make_mesh` from a mesh spec ("expert=8,tensor=2"); None for an empty spec. ValueError when the spec
    is malformed, does not match the device count, or (with `config`) cannot split the model."""
    if not text:
        return None
    return make_mesh(**parse_mesh_sizes(text), config=config)


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[Any] | None = None, *, config: Config | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "sequence", "expert", "tensor") of the given sizes.

    Args:
      data, fsdp, expert, tensor, sequence: axis sizes; their product must equal the number of devices.
      devices: the devices, in mesh order (default: all of `jax.devices()`, every process's in multi-host
        runs, laid out by `jax.make_mesh` for the physical topology).
      config: optional model config; when given, `check_mesh` verifies the model can be split.
    Raises:
      ValueError (one message) when a size is not a positive integer, the product does not match the
      device count, or the config cannot be split over the mesh.
    """
    sizes = dict(data=data, fsdp=fsdp, sequence=sequence, expert=expert, tensor=tensor)
    for name, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"make_mesh: {name}={n!r} must be a positive integer.")
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        used = " x ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "all axes 1"
        raise ValueError(f"make_mesh: {used} needs {math.prod(shape)} devices, but {len(devices)} are given; "
                         f"choose axis sizes whose product is {len(devices)}.")
    if not given:
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    else:
        mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                    axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if config is not None:
        check_mesh(config, mesh)
    return mesh


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of mesh axis `name` (1 when the mesh lacks it)."""
    return int(mesh.shape.get(name, 1))


def check_mesh(config: Config, mesh: Mesh) -> None:
    """Raise one ValueError listing every way `config` cannot be split over `mesh`."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    problems = []
    if unknown:
        problems.append(f"unknown mesh axes {unknown}; dsjax meshes use {MESH_AXES} (build them with "
                        "sharding.make_mesh)")
    ep, tp = axis_size(mesh, "expert"), axis_size(mesh, "tensor")
    c = config
    if c.n_routed_experts % ep:
        problems.append(f"n_routed_experts={c.n_routed_experts} is not divisible by expert={ep}")
    if c.num_attention_heads % tp:
        problems.append(f"num_attention_heads={c.num_attention_heads} is not divisible by tensor={tp}")
    if c.moe_intermediate_size % tp:
        problems.append(f"moe_intermediate_size={c.moe_intermediate_size} is not divisible by tensor={tp}")
    if c.n_dense_layers and c.intermediate_size % tp:
        problems.append(f"intermediate_size={c.intermediate_size} is not divisible by tensor={tp}")
    if problems:
        sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
        raise ValueError(f"the model cannot be split over the mesh ({sizes}): " + "; ".join(problems)
                         + ". Pick axis sizes that divide these dimensions.")
