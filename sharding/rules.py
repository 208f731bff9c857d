"""THE table of logical-axis -> mesh-axis rules. No other file names a mesh axis for an array dimension.

Mesh axes (outermost first; `make_mesh` lays devices out in this order, so `tensor` gets the closest
neighbours and `data` may span hosts / DCN):

    data      pure data parallelism: batch split, params replicated (gradients all-reduced).
    fsdp      batch split *and* params split (ZeRO-3): weights are all-gathered just in time per layer,
              gradients reduce-scattered.
    sequence  context parallelism: the sequence is split (zig-zag order); attention all-gathers only the
              compressed per-token state (latent 512 + rope key 64 + indexer key 128), see context_parallel.
              Outside attention it acts like a batch axis (tokens are independent).
    expert    expert parallelism: routed experts split, tokens exchanged by all-to-all (expert_parallel).
              Outside the MoE it acts like a batch axis.
    tensor    tensor (head / hidden) parallelism: attention heads, MLP and expert hidden dims split;
              partial products are summed (all-reduce) after the output projections.

Logical axes come from `dsjax.params` (weights) and from the activation / cache / optimizer names below.
Each rule lists mesh axes in order; a dimension is split over as many of them (in order) as divide it,
so that tiny or odd sizes (batch 1 at decode, a vocabulary of 129280 over 256 devices) fall back to
fewer axes or to replication instead of failing. The splits that the model cannot do without (experts over
`expert`, heads and hidden sizes over `tensor`) are checked up front by `mesh.check_mesh`.

Why these rules:
  * Weights: the hidden size D and the MLA latent ranks (q_lora 1536, kv_lora 512) go to `fsdp` *and* to
    the batch-like axes `sequence`/`expert` (non-expert weights would otherwise be replicated 64x on an
    expert=64 mesh: wq_b / wkv_b alone are 6.6 GB in bf16); heads / mlp / vocab go to `tensor`.
  * Routed experts [E, D, F]: E over `expert`, D over `fsdp`, F over `tensor`.
  * Indexer heads are not split over `tensor`: the index score sums over heads before the top-k, so a
    split would all-reduce a [T, S] score per layer; its weights are small (0.85B over 61 layers).
  * Activations: batch over (data, fsdp, expert), sequence over `sequence`, heads / vocab over `tensor`.
  * KV cache [L, B, S, dim]: batch like activations, cache length over `sequence`.
  * Optimizer state mirrors the params (see placement.opt_state_shardings).
"""

from __future__ import annotations

import math
from typing import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "expert", "tensor")

Rule = tuple[str, ...]

RULES: dict[str, Rule] = {
    # ---- weights (names from dsjax/params.py)
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp", "sequence", "expert"),
    "mtp_concat": ("fsdp", "sequence", "expert"),
    "q_lora": ("fsdp", "sequence", "expert"),
    "heads": ("tensor",),
    "qk_head": (),
    "kv_head": (),
    "v_head": (),
    "kv_lora_rope": (),
    "kv_lora": ("fsdp", "sequence", "expert"),
    "index_heads": (),
    "index_head": (),
    "mlp": ("tensor",),
    "exp": ("expert",),
    "embed_moe": ("fsdp",),
    "mlp_moe": ("tensor",),
    # ---- activations
    "act_batch": ("data", "fsdp", "expert"),
    "act_length": ("sequence",),
    "act_tokens": ("data", "fsdp", "expert", "sequence"),  # flattened batch x length (MoE dispatch)
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
    # ---- KV cache [L, B, S, dim]
    "cache_layers": (),
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_length": ("sequence",),
    "cache_dim": (),
}

ACTIVATION_AXES = ("act_batch", "act_length", "act_embed")  # [B, T, D]
LOGITS_AXES = ("act_batch", "act_length", "act_vocab")  # [B, T, V]
TOKEN_AXES = ("act_batch", "act_length")  # [B, T]
CACHE_AXES = ("cache_layers", "cache_batch", "cache_length", "cache_dim")  # [L, B, S, dim]


def mesh_axes_for(name: str | None) -> Rule:
    """The mesh axes a logical axis may be split over (in order); () for replicated."""
    if name is None:
        return ()
    if name not in RULES:
        raise ValueError(f"logical axis {name!r} has no sharding rule; add it to sharding/rules.py RULES "
                         f"(known: {sorted(RULES)}).")
    return RULES[name]


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    multiple_of: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes` on `mesh`.

    Each dimension takes the mesh axes of its rule, in order, while (when `shape` is given) the dimension
    stays divisible by their product times `multiple_of[dim]` (block alignment, e.g. FP8 scale blocks).
    Mesh axes of size 1 and axes already used by an earlier dimension are skipped.
    """
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        chosen: list[str] = []
        prod = 1
        for ax in mesh_axes_for(name):
            n = _size(mesh, ax)
            if n == 1 or ax in used:
                continue
            if shape is not None:
                unit = (multiple_of[i] if multiple_of is not None else 1) * prod * n
                if shape[i] % unit:
                    break  # keep the split a prefix of the rule: the layout stays predictable
            chosen.append(ax)
            prod *= n
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def logical_to_sharding(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding of an array with logical `axes` (and, optionally, its `shape`) on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def spec_size(spec: PartitionSpec, mesh: Mesh, dim: int) -> int:
    """Number of shards of dimension `dim` under `spec`."""
    if dim >= len(spec) or spec[dim] is None:
        return 1
    entry = spec[dim]
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(_size(mesh, a) for a in names)
