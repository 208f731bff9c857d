"""Sharding of dsjax over a device mesh: mesh + logical rules, expert-parallel MoE, context-parallel DSA.

Public API:
    make_mesh, mesh_from_spec, check_mesh        mesh.py (axes data, fsdp, sequence, expert, tensor)
    RULES, logical_to_spec, logical_to_sharding  rules.py (THE logical -> mesh axis table)
    param_shardings, shard_params, cache_shardings, opt_state_shardings, put     placement.py
    MeshParallelism, as_parallelism, parallelism_from_spec, forward_with_aux, sharded_forward, constrain  forward.py
    zigzag_order                                 context_parallel.py
"""

from sharding.context_parallel import cp_bytes_per_layer, zigzag_order
from sharding.expert_parallel import ep_bytes_per_layer
from sharding.forward import (MeshParallelism, as_parallelism, constrain, forward_with_aux, parallelism_from_spec,
                              sharded_forward)
from sharding.mesh import axis_size, check_mesh, make_mesh, mesh_from_spec, parse_mesh_sizes
from sharding.placement import cache_shardings, opt_state_shardings, param_shardings, put, shard_params
from sharding.rules import (ACTIVATION_AXES, CACHE_AXES, LOGITS_AXES, MESH_AXES, RULES, TOKEN_AXES,
                            logical_to_sharding, logical_to_spec)

__all__ = [
    "make_mesh", "mesh_from_spec", "parse_mesh_sizes", "check_mesh", "axis_size", "MESH_AXES", "RULES", "logical_to_spec", "logical_to_sharding",
    "ACTIVATION_AXES", "CACHE_AXES", "LOGITS_AXES", "TOKEN_AXES", "param_shardings", "shard_params",
    "cache_shardings", "opt_state_shardings", "put", "MeshParallelism", "as_parallelism", "parallelism_from_spec", "forward_with_aux",
    "sharded_forward",
    "constrain", "zigzag_order", "cp_bytes_per_layer", "ep_bytes_per_layer",
]
