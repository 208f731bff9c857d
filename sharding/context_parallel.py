"""Context (sequence) parallel DSA: the sequence is split over `sequence`; attention all-gathers only the
compressed per-token state.

Every token's projections, MLP and MoE are local to its shard. Attention needs other shards' keys, and in
MLA + DSA a key is tiny: the latent (kv_lora_rank = 512) + the rotary key (64) + the indexer key (128) =
704 values, shared by all 128 heads. So per layer each device all-gathers those rows (and the keys'
positions / segment ids) over `sequence`, then runs the ordinary local ops on its own queries: the
lightning indexer's top-k over all keys, then sparse (or dense) MLA. Queries, heads and outputs never move.

Communication per layer and device, with B_loc sequences of T tokens per `sequence` group of size sp
(bf16, both directions of training counted):

    forward   all-gather      B_loc · T · (sp-1)/sp · 704 · 2 bytes    (1.4 KB per remote token)
    backward  reduce-scatter  the same volume (gradients of the gathered rows)

versus all-gathering the hidden activations [B_loc, T, D = 7168] before attention: D / 704 = 10.2x more,
and still O(T) per device instead of streaming keys around a ring. At T = 128K, B_loc = 1, sp = 8 this is
161 MB per layer forward (experiments/bench_sharding.py measures it from the compiled HLO).

Load balance (zig-zag order): with causal attention the last tokens see the most keys. The sequence is cut
into 2·sp chunks and shard i holds chunks i and 2·sp-1-i, so every shard has the same causal work.
Positions travel with the tokens, so causality and RoPE are unchanged; the gathered keys are put back in
natural order before the indexer so that top-k ties resolve exactly as on one device.

Heads stay split over `tensor` inside the shard_map (queries [B, T, H/tp, .]); the indexer is computed
per tensor shard on replicated index heads (its score sums over heads before the top-k).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from dsjax.attention import is_sparse
from dsjax.latents import Latents, Queries
from dsjax.config import Config
from sharding.rules import RULES, logical_to_spec, spec_size

SEQUENCE_AXIS = RULES["act_length"][0]  # the mesh axis of the all-gather
LATENT_STATE = ("kv_lora_rank", "qk_rope_head_dim", "index_head_dim")  # what crosses devices per token


def zigzag_order(length: int, shards: int) -> np.ndarray | None:
    """Token order that balances causal work: order[i] = original index of the token at place i.

    The sequence is cut into 2·shards chunks; shard s holds chunks s and 2·shards-1-s. None when
    shards == 1 or length is not a multiple of 2·shards (then the natural order is kept).
    """
    if shards <= 1 or length % (2 * shards):
        return None
    c = length // (2 * shards)
    parts = []
    for s in range(shards):
        parts += [np.arange(s * c, (s + 1) * c), np.arange((2 * shards - 1 - s) * c, (2 * shards - s) * c)]
    return np.concatenate(parts).astype(np.int32)


def cp_bytes_per_layer(config: Config, seqs_per_device: int, length: int, sp: int, dtype_bytes: int = 2) -> int:
    """Analytic bytes one device receives per layer forward: the remote tokens' compressed state."""
    per_token = config.kv_lora_rank + config.qk_rope_head_dim + (config.index_head_dim if config.has_indexer else 0)
    return seqs_per_device * length * (sp - 1) // sp * per_token * dtype_bytes


def _smap_call(fn: Callable, mesh: Mesh, args: Sequence[Any], specs: Sequence[Any], out_spec: PartitionSpec):
    """shard_map over the whole mesh, passing None arguments through untouched."""
    keep = [i for i, a in enumerate(args) if a is not None]

    def body(*present):
        full: list[Any] = [None] * len(args)
        for i, a in zip(keep, present):
            full[i] = a
        return fn(*full)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[i] for i in keep),
                         out_specs=out_spec, check_vma=False)(*[args[i] for i in keep])


def make_attend(mesh: Mesh, key_order: np.ndarray | None = None) -> Callable[..., jax.Array]:
    """`dsjax.attention.attend` run sequence-parallel on `mesh` (`MeshParallelism.attend` calls it).

    key_order: the zig-zag order of the tokens when the sequence was permuted by `zigzag_order`
    (self-attention over those tokens); the gathered keys are restored to natural order before use.
    """
    inverse = None if key_order is None else np.argsort(key_order).astype(np.int32)

    def attend(local_fn: Callable, q: Queries, kv: Latents, config: Config, *, q_positions, k_positions,
               q_segment_ids=None, k_segment_ids=None, selection=None) -> tuple[jax.Array, jax.Array | None]:
        b, t = q.q_abs.shape[:2]
        s = kv.kv.shape[1]
        qp = jnp.broadcast_to(q_positions, (b, t))
        kp = jnp.broadcast_to(k_positions, (b, s))
        spec = functools.partial(logical_to_spec, mesh=mesh)
        q_spec = spec(("act_batch", "act_length", "act_heads", None), shape=q.q_abs.shape)
        q_tok = spec(("act_batch", "act_length"), shape=(b, t))
        k_tok = spec(("act_batch", "act_length"), shape=(b, s))
        # the batch split is shared by queries and keys (same B); only the sequence split may differ
        q_seq, k_seq = spec_size(q_tok, mesh, 1) > 1, spec_size(k_tok, mesh, 1) > 1
        if spec_size(q_tok, mesh, 0) != spec_size(k_tok, mesh, 0):
            raise ValueError("context parallelism: queries and keys must share the batch split.")
        k_row = PartitionSpec(*k_tok, None)
        restore = inverse is not None and q_seq and k_seq and s == t == len(inverse)

        def local(qa, qpe, iq, iw, kvl, kpe, ik, qpos, kpos, qseg, kseg, sel):
            if k_seq:  # bring every key's compressed state (and position / segment) to every shard
                g = lambda a: None if a is None else jax.lax.all_gather(a, SEQUENCE_AXIS, axis=1, tiled=True)
                kvl, kpe, ik, kpos, kseg = g(kvl), g(kpe), g(ik), g(kpos), g(kseg)
                if restore:
                    r = lambda a: None if a is None else jnp.take(a, inverse, axis=1)
                    kvl, kpe, ik, kpos, kseg = r(kvl), r(kpe), r(ik), r(kpos), r(kseg)
            # selected keys index the gathered keys in natural order, as on one device
            return local_fn(Queries(qa, qpe, iq, iw), Latents(kvl, kpe, ik), config, q_positions=qpos,
                            k_positions=kpos, q_segment_ids=qseg, k_segment_ids=kseg, selection=sel)

        q_row = PartitionSpec(*q_tok, None)
        args = (q.q_abs, q.q_pe, q.index_q, q.index_w, kv.kv, kv.k_pe, kv.index_k, qp, kp,
                q_segment_ids, k_segment_ids, selection)
        specs = (q_spec, q_spec, PartitionSpec(*q_tok, None, None), q_row, k_row, k_row, k_row, q_tok, k_tok,
                 q_tok, k_tok, q_row)
        return _smap_call(local, mesh, args, specs, (q_spec, q_row if is_sparse(config, s) else None))

    return attend
