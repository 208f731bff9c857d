"""Expert-parallel dropless MoE dispatch: `shard_map` over the whole mesh, tokens exchanged over `expert`.

Each device holds E/ep routed experts (F split over `tensor`) and its own slice of the tokens (split over
data, fsdp, expert and sequence: `rules.RULES["act_tokens"]`). Per MoE layer, on every device:

  1. the n local tokens are routed (`dsjax.moe.route`, per token, so local: letting XLA partition it would
     all-gather every token's [E] scores for the top-k) and their n·k (token, expert) slots are sorted by
     the shard that owns their expert;
  2. an all-to-all over `expert` sends every slot's hidden row to its expert's shard;
  3. the shard runs its experts as one grouped matmul (`dsjax.moe.experts_ffn`) over the received rows,
     sums the F-split partial products over `tensor` (psum, in fp32) and rounds once;
  4. the reverse all-to-all returns each row to its token, where the k slots are combined in fp32.

Nothing is dropped: buffers are sized for the worst case, n·min(k, E/ep) rows per (source, destination)
pair (all of a token's k experts can sit on one shard). Two exchanges implement steps 2 and 4:

  * "ragged" (TPU / GPU): `jax.lax.ragged_all_to_all` moves only the real rows; the per-pair row counts
    are shared first by a tiny all-gather of [ep] int32. Bytes per layer and device ≈ 2 · n·k·D·2 (bf16)
    · (ep-1)/ep, independent of the worst-case buffer.
  * "padded" (XLA:CPU, which does not implement ragged-all-to-all): `jax.lax.all_to_all` of the full
    worst-case buffers [ep, n·min(k, E/ep), D]. Same results, ep·min(k, E/ep)/k times the bytes.
  * "emulated" (tests only): ragged semantics built from all-gathers, to check the ragged bookkeeping on
    CPU where the real collective cannot run.

Compared with replicating the experts (all-gathering them per layer over the devices that hold them),
EP moves tokens instead of weights: 3·E·D·F·2 bytes (22.5 GB per layer at the real shapes) versus about
2·n·k·D·2 (see experiments/bench_sharding.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from dsjax import fp8
from dsjax.config import Config
from dsjax.layers import is_fp8, weight
from dsjax.moe import Routing, experts_ffn, route
from pallas_kernels.dispatch import cpu_only
from sharding.mesh import axis_size
from sharding.rules import RULES, logical_to_spec, spec_size

IMPLS = ("ragged", "padded", "emulated")
EXPERT_AXIS = RULES["exp"][0]  # the mesh axis of the all-to-all
TENSOR_AXIS = RULES["mlp_moe"][0]  # the mesh axis the expert hidden dim F is split over

# Logical axes of the routed-expert weights inside the shard_map: D is gathered (fsdp), E and F stay split.
_EXPERT_AXES = {"gate": ("exp", None, "mlp_moe"), "up": ("exp", None, "mlp_moe"), "down": ("exp", "mlp_moe", None)}


def default_impl() -> str:
    """"padded" on CPU (no ragged-all-to-all in XLA:CPU), "ragged" elsewhere (for the default device; with
    impl=None `make_dispatch` decides by the lowering platform instead)."""
    return "padded" if jax.default_backend() == "cpu" else "ragged"


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` semantics from all-gathers (tests on CPU; moves ep x the data)."""
    del recv_sizes  # implied by the senders' sizes
    ops = jax.lax.all_gather(operand, axis_name)
    io, ss, oo = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    me = jax.lax.axis_index(axis_name)
    start, size, src_off = oo[:, me], ss[:, me], io[:, me]
    r = jnp.arange(output.shape[0])
    inside = (r[None, :] >= start[:, None]) & (r[None, :] < (start + size)[:, None])  # [P, R]
    src = jnp.argmax(inside, axis=0)
    row = jnp.clip(src_off[src] + r - start[src], 0, operand.shape[0] - 1)
    vals = ops[src, row]
    hit = jnp.any(inside, axis=0).reshape((-1,) + (1,) * (operand.ndim - 1))
    return jnp.where(hit, vals, output)


def _local_weights(experts: Mapping[str, Any], dtype, tp: int, split: dict[str, bool]) -> dict[str, jax.Array]:
    """Materialise this shard's expert matrices; slice F here when the storage could not be split on it."""
    out = {}
    for name in ("gate", "up", "down"):
        w = weight(experts[name], None, dtype)
        if tp > 1 and not split[name]:
            f_axis = 2 if name != "down" else 1
            n = w.shape[f_axis] // tp
            w = jax.lax.dynamic_slice_in_dim(w, jax.lax.axis_index(TENSOR_AXIS) * n, n, axis=f_axis)
        out[name] = w
    return out


def _run_experts(rows, ids, w, config: Config, e_loc: int, tp: int, dtype, fp8_acts: bool):
    """Rows [R, D] with local expert ids [R] (e_loc = no expert) -> expert outputs [R, D] (dtype).
    fp8_acts: the experts are stored FP8 (official numerics quantise their inputs; `moe.experts_ffn`)."""
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    y = experts_ffn(rows[order], w, sizes, config, out_dtype=jnp.float32, fp8_acts=fp8_acts)
    if tp > 1:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return jnp.zeros_like(y, dtype).at[order].set(y.astype(dtype))


def _exchange(x, ids, combine, w, *, config: Config, ep: int, tp: int, impl: str, fp8_acts: bool):
    """One chunk on one device: x [n, D], ids [n, k] (-1 = padding token), combine [n, k] -> f32 [n, D]."""
    n, k = ids.shape
    d = x.shape[1]
    e_loc = config.n_routed_experts // ep
    m = n * k
    cap = n * min(k, e_loc)
    flat = ids.reshape(-1)
    valid = flat >= 0
    dst = jnp.where(valid, flat // e_loc, ep)  # owning shard; ep = not sent
    lid = jnp.where(valid, flat % e_loc, e_loc)  # expert id on that shard
    order = jnp.argsort(dst, stable=True)
    counts_ext = jnp.bincount(dst, length=ep + 1).astype(jnp.int32)
    starts_ext = jnp.cumsum(counts_ext) - counts_ext
    rank = jnp.zeros(m, jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32) - starts_ext[dst[order]])
    tok = jnp.arange(m) // k
    if impl == "padded":
        send = jnp.zeros((ep, cap, d), x.dtype).at[dst, rank].set(x[tok], mode="drop")
        send_id = jnp.full((ep, cap), e_loc, jnp.int32).at[dst, rank].set(lid, mode="drop")
        recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
        recv_id = jax.lax.all_to_all(send_id, EXPERT_AXIS, 0, 0, tiled=True)
        y = _run_experts(recv.reshape(ep * cap, d), recv_id.reshape(-1), w, config, e_loc, tp, x.dtype, fp8_acts)
        back = jax.lax.all_to_all(y.reshape(ep, cap, d), EXPERT_AXIS, 0, 0, tiled=True)
        slots = back.at[dst, rank].get(mode="fill", fill_value=0)
    else:
        a2a: Callable = jax.lax.ragged_all_to_all if impl == "ragged" else ragged_all_to_all_emulated
        counts, starts = counts_ext[:ep], starts_ext[:ep]
        table = jax.lax.all_gather(counts, EXPERT_AXIS)  # [src, dst] row counts
        me = jax.lax.axis_index(EXPERT_AXIS)
        out_off = (jnp.cumsum(table, axis=0) - table)[me]  # where my rows land on each destination
        recv_sizes = table[:, me]
        recv_off = jnp.cumsum(recv_sizes) - recv_sizes
        back_off = (jnp.cumsum(table, axis=1) - table)[:, me]  # where each source keeps its rows for me
        buf = ep * cap
        xs = x[tok[order]]
        recv = a2a(xs, jnp.zeros((buf, d), x.dtype), starts, counts, out_off, recv_sizes, axis_name=EXPERT_AXIS)
        recv_id = a2a(lid[order][:, None], jnp.full((buf, 1), e_loc, jnp.int32), starts, counts, out_off,
                      recv_sizes, axis_name=EXPERT_AXIS)[:, 0]
        y = _run_experts(recv, recv_id, w, config, e_loc, tp, x.dtype, fp8_acts)
        back = a2a(y, jnp.zeros((m, d), x.dtype), recv_off, recv_sizes, back_off, counts, axis_name=EXPERT_AXIS)
        slots = jnp.zeros((m, d), x.dtype).at[order].set(back)
        slots = jnp.where(valid[:, None], slots, 0)
    return jnp.einsum("nkd,nk->nd", slots.reshape(n, k, d).astype(jnp.float32), combine)


def _dispatch_local(x, valid, router, bias, experts, chosen, *, config: Config, ep: int, tp: int, impl: str,
                    split: dict[str, bool], chunk: int, replay: bool):
    """Per-device body: route the local tokens (padding rows route nowhere; with `replay`, to the experts
    `chosen`), then run them through the exchange in chunks of `chunk` (bounded worst-case buffers), each
    chunk rematerialised in the backward pass so only one chunk's buffers are alive at a time. Returns
    (f32 [n, D], Routing)."""
    with jax.named_scope("moe_route"):
        r = route(x, router, bias, config, chosen if replay else None)
    ids, combine = jnp.where(valid[:, None], r.experts, -1), r.weights
    fp8_acts = config.official_numerics and is_fp8(experts["gate"])
    w = _local_weights(experts, jnp.float32 if fp8_acts else x.dtype, tp, split)  # exact FP8 values in f32
    run = functools.partial(_exchange, config=config, ep=ep, tp=tp, impl=impl, fp8_acts=fp8_acts)
    n = x.shape[0]
    if n <= chunk:
        return run(x, ids, combine, w), r
    nc = n // chunk  # the caller pads n to a multiple of chunk
    xs = tuple(a.reshape((nc, chunk) + a.shape[1:]) for a in (x, ids, combine))
    step = jax.checkpoint(lambda w, x, i, c: run(x, i, c, w))
    _, out = jax.lax.scan(lambda _, a: (None, step(w, *a)), None, xs)
    return out.reshape(n, -1), r


def _expert_specs(experts: Mapping[str, Any], mesh: Mesh, block: int):
    """in_specs of the per-layer expert leaves, and whether each one's F dim is split by them."""
    specs, split = {}, {}
    for name, leaf in experts.items():
        axes = _EXPERT_AXES[name]
        f_dim = axes.index("mlp_moe")
        if isinstance(leaf, Mapping):  # FP8 {qweight [E, in, out], scale [E, in/b, out/b]}
            mult = tuple(block if i == f_dim else 1 for i in range(3))
            s = logical_to_spec(axes, mesh, leaf["qweight"].shape, multiple_of=mult)
            specs[name] = {"qweight": s, "scale": s}
        else:
            s = logical_to_spec(axes, mesh, leaf.shape)
            specs[name] = s
        split[name] = spec_size(s, mesh, f_dim) > 1
    return specs, split


DEFAULT_BUFFER_BYTES = 1 << 29  # worst-case receive buffer per exchange and device (512 MiB)


def chunk_tokens(config: Config, ep: int, itemsize: int, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> int:
    """Local tokens per exchange so that the worst-case receive buffer [ep * chunk * min(k, E/ep), D]
    fits `buffer_bytes` (at least 1)."""
    per_token = ep * min(config.num_experts_per_tok, config.n_routed_experts // ep) * config.hidden_size * itemsize
    return max(1, buffer_bytes // per_token)


def make_dispatch(mesh: Mesh, impl: str | None = None,
                  buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Callable[..., jax.Array]:
    """Route + expert-parallel dispatch on `mesh` (`MeshParallelism.route_and_dispatch` calls it).

    impl: "ragged" | "padded" | "emulated"; None: "ragged" when lowered for an accelerator, "padded" for CPU
    (both are traced and `lax.platform_dependent` keeps one, so an AOT compile for TPU from a CPU host
    gets the ragged all-to-all). buffer_bytes bounds the worst-case receive buffer: a device's tokens go
    through the exchange in chunks that fit it.
    """
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"expert-parallel impl={impl!r}: expected one of {IMPLS}.")
    ep, tp = axis_size(mesh, EXPERT_AXIS), axis_size(mesh, TENSOR_AXIS)

    def dispatch(x: jax.Array, p: Mapping[str, Any], config: Config,
                 chosen: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        n, d = x.shape
        replay = chosen is not None
        if chosen is None:
            chosen = jnp.zeros((n, config.num_experts_per_tok), jnp.int32)  # unused: routed inside
        tok_spec = logical_to_spec(("act_tokens", None), mesh)
        shards = spec_size(tok_spec, mesh, 0)
        local = -(-n // shards)
        chunk = chunk_tokens(config, ep, x.dtype.itemsize, buffer_bytes)
        if local > chunk:  # even chunks: ceil(local / chunk) of them
            chunk = -(-local // -(-local // chunk))
        else:
            chunk = local
        pad = -n % (shards * chunk)  # padding tokens route nowhere and are cut off below
        valid = jnp.arange(n + pad) < n
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)))
            chosen = jnp.pad(chosen, ((0, pad), (0, 0)))
        experts = p["experts"]
        f_local = config.moe_intermediate_size // tp
        if config.official_numerics and is_fp8(experts["gate"]) and tp > 1 and f_local % fp8.BLOCK:
            raise ValueError(f"official numerics quantise the experts' down-projection input in 128-blocks of the "
                             f"hidden size; moe_intermediate_size={config.moe_intermediate_size} over tensor={tp} "
                             f"leaves {f_local} per device, not whole blocks. Use a tensor size that keeps "
                             "multiples of 128, or the bf16 numerics.")
        specs, split = _expert_specs(experts, mesh, config.fp8_weight_block or fp8.BLOCK)
        local_fn = functools.partial(_dispatch_local, config=config, ep=ep, tp=tp, split=split, chunk=chunk,
                                     replay=replay)
        if impl is None and cpu_only():
            body = functools.partial(local_fn, impl="padded")
        elif impl is None:
            def body(*a):
                return jax.lax.platform_dependent(*a, cpu=functools.partial(local_fn, impl="padded"),
                                                  default=functools.partial(local_fn, impl="ragged"))
        else:
            body = functools.partial(local_fn, impl=impl)
        # routing runs inside too: XLA's partitioner would all-gather every token's scores for top_k
        rep = PartitionSpec()
        out, r = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, rep, rep, specs, tok_spec),
                               out_specs=(tok_spec, Routing(tok_spec, tok_spec, tok_spec)),
                               check_vma=False)(x, valid, p["router"], p["bias"], dict(experts), chosen)
        return out[:n], Routing(*(a[:n] for a in r))

    return dispatch


def ep_bytes_per_layer(config: Config, tokens_per_device: int, ep: int, impl: str, dtype_bytes: int = 2) -> int:
    """Analytic bytes one device sends per MoE layer forward (both exchanges, hidden rows only)."""
    k, e_loc, d = config.num_experts_per_tok, config.n_routed_experts // ep, config.hidden_size
    if impl == "padded":
        rows = ep * tokens_per_device * min(k, e_loc)
    else:
        rows = tokens_per_device * k
    return 2 * rows * d * dtype_bytes * (ep - 1) // ep if ep > 1 else 0


