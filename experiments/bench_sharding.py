"""Collective bytes per layer of expert parallelism and context parallelism, read from the compiled HLO
at the real DeepSeek V3.2 shapes, against the naive alternatives in the same run.

    python experiments/bench_sharding.py [--ep=64] [--ep_tokens=512] [--sp=8] [--cp_len=32768]

Table 1 (one MoE layer, mesh expert=ep, `ep_tokens` tokens per device):
  * dsjax EP, padded exchange (what XLA:CPU compiles): all-to-all of worst-case buffers;
  * dsjax EP, ragged exchange (TPU/GPU): lowered only (XLA:CPU cannot compile ragged-all-to-all), its
    buffers from the lowered module and the bytes it actually moves under uniform routing;
  * naive: replicate the experts (all-gather every expert's weights per layer, tokens stay put).
Table 2 (one attention layer, mesh sequence=sp, one sequence of `cp_len` tokens):
  * dsjax CP: all-gather of the compressed per-token state (latent 512 + rope 64 + indexer key 128);
  * naive: all-gather the hidden activations [T, 7168] before the attention projections.
Weights other than the routed experts are replicated here, so every collective in the HLO belongs to the
strategy. Per op kind, "bytes" is the per-device result buffer of the collective in the HLO right after XLA's SPMD
partitioner (per-device program, model dtypes; read from an XLA dump): later XLA:CPU passes run bf16
collectives in f32, which TPU/GPU do not, so the final CPU HLO would show twice the bytes. "moved" multiplies by (n-1)/n (the part that crosses devices; 2(n-1)/n for all-reduce).
Nothing is allocated: inputs are abstract (jax.ShapeDtypeStruct). Forward pass only; the backward pass
mirrors it (all-to-all back, reduce-scatter for an all-gather).
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("ep", 64, "Expert-parallel degree (simulated devices for table 1).")
flags.DEFINE_integer("ep_tokens", 512, "Tokens per device entering one MoE layer.")
flags.DEFINE_integer("sp", 8, "Context-parallel degree (simulated devices for table 2).")
flags.DEFINE_integer("cp_len", 32768, "Sequence length of table 2.")
flags.DEFINE_string("config", "deepseek-v3.2", "dsjax preset (real shapes).")

_DT = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f8e4m3fn": 1, "pred": 1, "s8": 1, "u8": 1}
_OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute", "ragged-all-to-all")
_SHAPE = re.compile(r"\b(bf16|f16|f32|s32|u32|f8e4m3fn|pred|s8|u8)\[([0-9,]*)\]")


def _bytes(type_text: str) -> int:
    return sum(_DT[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(type_text))


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]+)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups, size]
    return int(m.group(2)) if m else default


def collectives(hlo: str, n_default: int) -> dict[str, tuple[int, int, float]]:
    """{op: (count, result bytes, moved bytes)} over the compiled per-device HLO text."""
    out: dict[str, list] = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(_OPS) + r")(-start)?\(", line)
        if not m:
            continue
        op, result = m.group(2), m.group(1)
        if m.group(3):  # async start: (operands..., result) tuple; the result is the last element
            result = result.rsplit(",", 1)[-1]
        b = _bytes(result)
        n = _group_size(line, n_default)
        moved = b * (2 * (n - 1) / n if op == "all-reduce" else (n - 1) / n)
        c = out.setdefault(op, [0, 0, 0.0])
        c[0] += 1
        c[1] += b
        c[2] += moved
    return {k: tuple(v) for k, v in out.items()}


_DUMP = tempfile.mkdtemp(prefix="bench_sharding_hlo_")


def partitioned_hlo(compiled) -> str:
    """The per-device HLO right after SPMD partitioning of the latest compile (from the XLA dump)."""
    files = glob.glob(os.path.join(_DUMP, "*after_spmd-partitioning*.txt"))
    if not files:  # dumping unavailable: fall back to the final CPU HLO (bf16 collectives shown as f32)
        return compiled.as_text()
    return open(max(files, key=os.path.getmtime)).read()


def _layer_params(config, which: str, mesh):
    """Abstract params of one layer of the `which` stack ("moe") and their shardings: routed experts split
    over `expert` by the rules, every other weight replicated, so that the only collectives left in the
    HLO are the strategy's own (FSDP weight gathers would be the same for every strategy)."""
    import jax
    from jax.sharding import NamedSharding

    import sharding
    from dsjax.params import ParamSpec, param_dtype, param_specs

    specs = param_specs(config)[which]
    is_spec = lambda x: isinstance(x, ParamSpec)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], param_dtype(s, config)), specs, is_leaf=is_spec)
    shards = jax.tree.map(lambda s: NamedSharding(mesh, sharding.logical_to_spec(
        tuple(a if a == "exp" else None for a in s.axes[1:]), mesh, s.shape[1:])), specs, is_leaf=is_spec)
    return shapes, shards


def ep_table(config, ep: int, tokens: int):
    import jax
    from jax.sharding import PartitionSpec as P

    import sharding
    from dsjax import moe

    mesh = sharding.make_mesh(expert=ep, devices=jax.devices()[:ep], config=config)
    p_shapes, p_shards = _layer_params(config, "moe", mesh)
    p_shapes, p_shards = p_shapes["moe"], p_shards["moe"]
    x = jax.ShapeDtypeStruct((ep, tokens, config.hidden_size), config.compute_dtype)
    x_sh = sharding.logical_to_sharding(sharding.ACTIVATION_AXES, mesh, x.shape)
    big = 1 << 50  # one exchange per layer (no token chunks), to read a layer's bytes off the HLO

    def ours(impl):
        def f(p, x):
            return moe.moe(p, x, config, sharding.MeshParallelism(mesh, ep_impl=impl, ep_buffer_bytes=big))[0]
        return f

    def replicate_experts(p, x):
        """Naive: every device all-gathers all experts' weights, then dispatches its own tokens locally."""
        def local(p, x):
            p = dict(p, experts=jax.tree.map(lambda w: jax.lax.all_gather(w, "expert", axis=0, tiled=True),
                                             p["experts"]))
            return moe.moe(p, x, config)[0]
        # the other weights enter whole (XLA gathers them, as it does for the dsjax path)
        specs = jax.tree.map(lambda s: P(), p_shards)
        specs["experts"] = jax.tree.map(lambda s: P("expert"), p_shards["experts"])
        in_specs = (specs, P("expert"))
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P("expert"), check_vma=False)(p, x)

    rows = []
    for name, fn, compile_it in (("dsjax EP, padded all-to-all (CPU)", ours("padded"), True),
                                 ("dsjax EP, ragged a2a (TPU/GPU; moved: analytic)", ours("ragged"), False),
                                 ("naive: replicate experts (all-gather weights)", replicate_experts, True)):
        t0 = time.time()
        lowered = jax.jit(fn, in_shardings=(p_shards, x_sh), out_shardings=x_sh).lower(p_shapes, x)
        if compile_it:
            rows.append((name, collectives(partitioned_hlo(lowered.compile()), ep), time.time() - t0))
        else:
            rows.append((name, _ragged_from_lowered(lowered.as_text(), config, ep, tokens), time.time() - t0))
    return rows, mesh


def _ragged_from_lowered(text: str, config, ep: int, tokens: int):
    """Ragged exchange: receive buffers from the lowered module; moved bytes for uniform routing."""
    from sharding.expert_parallel import ep_bytes_per_layer

    n_ops = text.count("ragged_all_to_all")
    k, e_loc, d = config.num_experts_per_tok, config.n_routed_experts // ep, config.hidden_size
    buffer = 2 * ep * tokens * min(k, e_loc) * d * 2  # forward and return hidden-row buffers (bf16)
    return {"ragged-all-to-all": (n_ops, buffer, float(ep_bytes_per_layer(config, tokens, ep, "ragged")))}


def cp_table(config, sp: int, length: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import sharding
    from dsjax import attention
    from dsjax.rope import cos_sin

    mesh = sharding.make_mesh(sequence=sp, devices=jax.devices()[:sp], config=config)
    p_shapes, p_shards = _layer_params(config, "moe", mesh)
    p_shapes, p_shards = p_shapes["attn"], p_shards["attn"]
    x = jax.ShapeDtypeStruct((1, length, config.hidden_size), config.compute_dtype)
    x_sh = sharding.logical_to_sharding(sharding.ACTIVATION_AXES, mesh, x.shape)

    def ours(p, x):
        pos = jnp.arange(length, dtype=jnp.int32)[None]
        cos, sin = cos_sin(config, pos)
        return attention.mla(p, x, cos, sin, config, positions=pos, parallel=sharding.MeshParallelism(mesh))[0]

    def gather_activations(p, x):
        """Naive: all-gather the hidden states, project every token's keys locally, attend own queries."""
        def local(p, x, pos):
            full = jax.lax.all_gather(x, "sequence", axis=1, tiled=True)
            full_pos = jax.lax.all_gather(pos, "sequence", axis=1, tiled=True)
            cf, sf = cos_sin(config, full_pos)
            cl, sl = cos_sin(config, pos)
            q, _ = attention.project(p, x, cl, sl, config)
            _, kv = attention.project(p, full, cf, sf, config)
            o, _ = attention.attend_local(q, kv, config, q_positions=pos, k_positions=full_pos)
            return attention.output(p, o, config)
        pos = jnp.arange(length, dtype=jnp.int32)[None]
        specs = (jax.tree.map(lambda s: P(), p_shards), P(None, "sequence"), P(None, "sequence"))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(None, "sequence"),
                             check_vma=False)(p, x, pos)

    rows = []
    for name, fn in (("dsjax CP: all-gather latent+rope+index key", ours),
                     ("naive: all-gather hidden activations", gather_activations)):
        t0 = time.time()
        compiled = jax.jit(fn, in_shardings=(p_shards, x_sh), out_shardings=x_sh).lower(p_shapes, x).compile()
        rows.append((name, collectives(partitioned_hlo(compiled), sp), time.time() - t0))
    return rows, mesh


def _print(title: str, rows, base: str):
    print(f"\n{title}")
    print(f"  {'strategy':<48}{'collective':<20}{'count':>6}{'bytes/dev MB':>14}{'moved/dev MB':>14}{'compile s':>11}")
    totals = {}
    for name, ops, secs in rows:
        totals[name] = sum(v[2] for v in ops.values())
        items = sorted(ops.items(), key=lambda kv: -kv[1][2]) or [("(none)", (0, 0, 0.0))]
        for i, (op, (n, b, mv)) in enumerate(items):
            label, t = (name, f"{secs:.1f}") if i == 0 else ("", "")
            print(f"  {label:<48}{op:<20}{n:>6}{b / 1e6:>14.1f}{mv / 1e6:>14.1f}{t:>11}")
    ref = totals[base]
    print(f"  moved per layer and device (ratio to '{base}'):")
    for name, moved in totals.items():
        ratio = f"x{moved / ref:.2f}" if ref else "-"
        print(f"    {name:<48}{moved / 1e6:>12.1f} MB  {ratio}")


def main(argv):
    del argv
    n = max(FLAGS.ep, FLAGS.sp)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                               f" --xla_dump_to={_DUMP} --xla_dump_hlo_pass_re=spmd-partitioning")
    import dsjax

    cfg = dsjax.Config.preset(FLAGS.config)
    print(f"{FLAGS.config}: D={cfg.hidden_size}, E={cfg.n_routed_experts}, k={cfg.num_experts_per_tok}, "
          f"F={cfg.moe_intermediate_size}, latent={cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}+{cfg.index_head_dim}")
    rows, _ = ep_table(cfg, FLAGS.ep, FLAGS.ep_tokens)
    _print(f"Table 1: one MoE layer, expert={FLAGS.ep}, {FLAGS.ep_tokens} tokens per device (bf16)", rows,
           rows[1][0])
    rows, _ = cp_table(cfg, FLAGS.sp, FLAGS.cp_len)
    _print(f"Table 2: one attention layer, sequence={FLAGS.sp}, 1 x {FLAGS.cp_len} tokens (bf16)", rows, rows[0][0])
    shutil.rmtree(_DUMP, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
