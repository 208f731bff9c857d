"""AOT memory plan: lower and compile a full dsjax step on a device mesh, with abstract inputs only.

    python experiments/plan.py --config=deepseek-v3.2 --mesh=expert=64,fsdp=4 --mode=train \\
        --seq_len=4096 --batch=256 --hbm_gb=95
    python experiments/plan.py --mesh=expert=8 --mode=decode --weights=fp8 --seq_len=32768 --batch=64 --hbm_gb=141

Nothing is allocated: params, optimizer state, KV cache and tokens are `jax.ShapeDtypeStruct`s placed by
the `sharding` rules on a mesh of simulated CPU devices (XLA's host-platform device count, set here before
jax is imported). The step is compiled by XLA:CPU's SPMD partitioner, and the per-device numbers come from
`compiled.memory_analysis()`: arguments (split into params / optimizer state / KV cache / tokens by their
shardings), outputs not aliased to donated inputs, and temporaries (activations and workspace).

Modes:
  train    cross-entropy on next tokens (over position chunks, --ce_chunk_mb), gradients, AdamW update
           (fp32 moments, bf16 params), layer remat.
  prefill  forward of `seq_len` prompt tokens writing a `seq_len`-slot KV cache; last-position logits.
  decode   one new token per sequence against a full `seq_len`-slot KV cache.
  grpo     dsjax's own GRPO step (`dsjax.train.step`, stage="grpo") on a rollout batch of `batch` rows of
           `seq_len` tokens: LoRA adapters trained (AdamW), the bf16 base frozen, the rollout's MoE routing and
           DSA keys replayed (int32 [B, T, layers, top-k] inputs), the sampler's kept vocabulary as bits, the
           log-probs over position chunks (--ce_chunk_mb). The rollouts themselves are the decode plan.

With --topology (e.g. v5p:4x4x4) the mesh is libtpu's compile-only TPU chips instead: the step is compiled by
XLA:TPU with the TPU kernels (the ops pick their backend by the lowering platform), the ragged all-to-all and
TPU layouts, so its numbers are the TPU's own buffer plan, not an estimate.

Caveats (simulated CPU): temporaries are XLA:CPU's buffer assignment, an estimate of TPU/GPU's (fusion and layouts differ).
XLA:CPU has no native FP8 (and some bf16) kernels: its float-normalization passes upcast such ops, and
while-loop-invariant code motion then hoists the upcast of *whole layer stacks* (e.g. all 58 layers' FP8
experts to f16, 51 GB) out of the layer loop. TPU and GPU run these types natively and never build those
copies, so the plan disables that one CPU pass (`--cpu_licm` keeps it, to see the raw CPU number).
The expert all-to-all uses the "padded" exchange on CPU, whose buffers have the same static shapes as the
"ragged" exchange used on TPU/GPU. Inputs the step does not read (the MTP module outside train) are
counted in the rows but dropped by XLA from `argument`.
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax import cli  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "deepseek-v3.2", "dsjax preset.")
flags.DEFINE_string("mesh", "expert=64,fsdp=4", "Mesh axis sizes, e.g. expert=64,fsdp=4 (axes: data, fsdp, "
                    "sequence, expert, tensor).")
flags.DEFINE_enum("mode", "train", ["train", "prefill", "decode", "grpo"], "Which step to plan.")
flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence (train / prefill) or KV-cache length (decode).")
flags.DEFINE_integer("batch", None, "Global batch (default: one sequence per batch shard).")
flags.DEFINE_float("hbm_gb", 95.0, "Device memory in GB (v5p 95, H200 141, H100 80, v6e 32).")
flags.DEFINE_enum("weights", "bf16", ["bf16", "fp8"], "Weight storage: bf16, or the official block-FP8 "
                  "(quantised matrices as e4m3 + 128x128 scales; serving modes only).")
flags.DEFINE_string("remat", "full", "Layer rematerialisation policy for train (dsjax.model.remat_policy).")
flags.DEFINE_integer("ep_buffer_mb", 512, "Bound on the expert all-to-all's worst-case receive buffer (MiB).")
flags.DEFINE_integer("ce_chunk_mb", 1024, "Train: f32 logits the loss holds at once per device (MiB; 0 = all), "
                     "as finetune.py's --ce_chunk_mb.")
flags.DEFINE_integer("lora_rank", 16, "grpo: LoRA rank of the adapters trained (the base is frozen and the "
                     "KL reference)")
flags.DEFINE_list("lora_targets", ["attn"], "grpo: LoRA targets (attn, shared, experts)")
flags.DEFINE_float("kl_beta", 0.0, "grpo: β of the KL penalty (> 0 adds the reference forward, adapters off)")
flags.DEFINE_bool("row", False, "Also print the plan as a row of the README's memory-plan table (which is made of "
                  "these rows, not typed).")
flags.DEFINE_bool("cpu_licm", False, "Keep XLA:CPU's while-loop-invariant code motion (see the module docstring).")
flags.DEFINE_string("topology", "", "Plan on a compile-only TPU topology instead of simulated CPU devices, e.g. "
                    "v5p:4x4x4 (64 chips), v5e:4x4, v6e:4x4: the real XLA:TPU compiler, layouts and the TPU "
                    "kernels. Needs libtpu in $DSJAX_LIBTPU_DIR (default <repo>/.libtpu, see the README).")

GB = 1e9


def fp8_abstract_params(config):
    """Abstract params with the official checkpoint's FP8 storage for the matrices it quantises."""
    import jax
    import numpy as np

    from checkpoints.hf_names import hf_table, matrix_shape
    from dsjax import fp8
    from dsjax.params import abstract_params, param_specs

    specs = param_specs(config)
    tree = jax.tree.map(lambda x: x, abstract_params(config))
    block = config.fp8_weight_block or fp8.BLOCK
    done = set()
    for t in hf_table(config).values():
        if not t.quantized or t.path in done:
            continue
        done.add(t.path)
        spec = specs
        for k in t.path:
            spec = spec[k]
        m = matrix_shape(spec, t)
        lead = spec.shape[: len(spec.shape) - len(m)]
        rows, cols = math.prod(m[: t.n_in]), math.prod(m[t.n_in:])
        node = tree
        for k in t.path[:-1]:
            node = node[k]
        node[t.path[-1]] = {
            "qweight": jax.ShapeDtypeStruct(lead + (rows, cols), np.dtype(fp8.E4M3)),
            "scale": jax.ShapeDtypeStruct(lead + (-(-rows // block), -(-cols // block)), np.float32)}
    return tree


def per_device_bytes(tree, shardings) -> int:
    import jax

    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def build(mode: str, config, mesh, batch: int, seq_len: int, weights: str, remat: str, ep_buffer: int,
          ce_chunk: int | None = None, packed_cache: bool = False):
    """(step function, abstract args, in_shardings, out_shardings, donate, {category: args index})."""
    import jax
    import jax.numpy as jnp
    import optax

    import sharding
    from dsjax import abstract_params, cache as cache_lib, model
    from dsjax.train.losses import head_cross_entropy

    params = fp8_abstract_params(config) if weights == "fp8" else abstract_params(config)
    ps = sharding.param_shardings(config, mesh, like=params)
    rep = sharding.logical_to_sharding((), mesh)
    if mode == "grpo":
        return build_grpo(config, mesh, params, ps, batch, seq_len, remat, ep_buffer, ce_chunk)
    if mode == "train":
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        tok_sh = sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape)
        opt = optax.adamw(1e-4)
        f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
        state = jax.eval_shape(opt.init, f32)  # fp32 moments
        ss = sharding.opt_state_shardings(state, config, mesh, params=params)

        def loss_fn(p, t):
            # the training objective's head: cross-entropy over position chunks (never all the logits)
            _, aux = sharding.forward_with_aux(p, t, config, mesh, remat=remat, ep_buffer_bytes=ep_buffer)
            targets = jnp.concatenate([t[:, 1:], t[:, :1]], axis=1)
            weights = jnp.ones(t.shape, jnp.float32).at[:, -1].set(0.0)
            nll, count = head_cross_entropy(aux.hidden, p["lm_head"], targets, weights,
                                            chunk_bytes=ce_chunk and ce_chunk * mesh.size)
            return nll / count

        def step(p, s, t):
            loss, grads = jax.value_and_grad(loss_fn)(p, t)
            updates, s = opt.update(grads, s, p)
            return loss, optax.apply_updates(p, updates), s

        return (step, (params, state, tokens), (ps, ss, tok_sh), (rep, ps, ss), (0, 1),
                {"params": 0, "optimizer state": 1, "tokens": 2})
    cache = jax.eval_shape(lambda: cache_lib.layer_caches(cache_lib.init_cache(config, batch, seq_len,
                                                                               packed=packed_cache)))
    cs = sharding.cache_shardings(cache, mesh)
    t_new = seq_len if mode == "prefill" else 1
    tokens = jax.ShapeDtypeStruct((batch, t_new), jnp.int32)
    tok_sh = sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape)

    def step(p, c, t):
        pos = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32) + (seq_len - t.shape[1]), t.shape)
        aux = model.forward_hidden(p, t, config, positions=pos, cache=c,
                                   parallel=sharding.MeshParallelism(mesh, ep_buffer_bytes=ep_buffer))
        logits = model.lm_head(p, aux.hidden[:, -1])
        return sharding.constrain(logits, ("act_batch", "act_vocab"), mesh), aux.cache

    return (step, (params, cache, tokens), (ps, cs, tok_sh),
            (sharding.logical_to_sharding(("act_batch", "act_vocab"), mesh, (batch, config.vocab_size)), cs),
            (1,), {"params": 0, "KV cache": 1, "tokens": 2})


def build_grpo(config, mesh, params, ps, batch: int, seq_len: int, remat: str, ep_buffer: int,
               ce_chunk: int | None):
    """The GRPO step's (function, abstract args, shardings, ...) as `build` returns them."""
    import jax
    import jax.numpy as jnp

    import sharding
    from dsjax import lora, parallel as parallel_lib
    from dsjax.train import grpo, schedule, step as step_lib

    tc = step_lib.TrainConfig(
        stage="grpo", remat=remat, bias_update_rate=0.0, ce_chunk_bytes=ce_chunk,
        lora=lora.LoraConfig(rank=FLAGS.lora_rank, targets=tuple(FLAGS.lora_targets)),
        grpo=grpo.GRPOConfig(kl_beta=FLAGS.kl_beta), optim=schedule.OptimConfig(weight_decay=0.0))
    adapters = jax.eval_shape(lambda: lora.init(config, tc.lora, jax.random.key(0)))
    train = jax.eval_shape(lambda a: step_lib.trainable({"params": params, "lora": a}, tc), adapters)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "lora": adapters,
             "opt_state": jax.eval_shape(schedule.make_optimizer(tc.optim).init, train),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    rep = sharding.logical_to_sharding((), mesh)
    # as trainer.place_state: the base by its rules, adapters and their moments (small) replicated
    ss = {**jax.tree.map(lambda _: rep, {k: v for k, v in state.items() if k != "params"}), "params": ps}
    n_dense, n_moe, k = config.n_dense_layers, config.n_moe_layers, config.index_topk

    def rows(*tail, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((batch, seq_len) + tail, dtype)

    b = {"tokens": rows(), "targets": rows(), "positions": rows(), "segment_ids": rows(),
         "completion": rows(dtype=jnp.float32), "old_logprob": rows(dtype=jnp.float32),
         "mask_bits": rows(-(-config.vocab_size // 32), dtype=jnp.uint32),
         "advantages": jax.ShapeDtypeStruct((batch,), jnp.float32),
         "selection": {"moe_experts": rows(n_moe, config.num_experts_per_tok)}}
    if seq_len > k:  # the DSA keys are replayed only where attention is sparse
        b["selection"].update({"dense": rows(n_dense, k), "moe": rows(n_moe, k)})
    bs = jax.tree.map(lambda x: sharding.logical_to_sharding(
        parallel_lib.TOKENS[:x.ndim] + (None,) * max(0, x.ndim - 2), mesh, x.shape), b)
    par = sharding.MeshParallelism(mesh, ep_buffer_bytes=ep_buffer)

    def fn(st, bt):
        return step_lib.train_step(st, bt, config=config, tc=tc, parallel=par)

    return (fn, (state, b), (ss, bs), (ss, None), (0,),
            {"params": ("params", 0), "LoRA adapters + optimizer state": ("rest", 0), "rollout batch": 1})


def main(argv):
    del argv
    from sharding.mesh import parse_mesh_sizes  # imports jax; its backend starts later, with the flags below

    try:
        sizes = parse_mesh_sizes(FLAGS.mesh)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}") from None
    n_dev = math.prod(sizes.values())
    if FLAGS.topology:  # libtpu's compile-only devices: nothing runs, the TPU compilers plan the program
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, os.environ.get("DSJAX_LIBTPU_DIR", os.path.join(repo, ".libtpu")))
        for k, v in (("JAX_PLATFORMS", "cpu"), ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(k, v)
    else:
        xla = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}"
        if not FLAGS.cpu_licm:
            xla += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
        os.environ["XLA_FLAGS"] = xla
    import contextlib

    import jax
    from jax.experimental import topologies

    import dsjax
    import sharding

    devices, device_ctx = None, contextlib.nullcontext()
    if FLAGS.topology:
        try:
            devices = topologies.get_topology_desc(FLAGS.topology, "tpu").devices
        except Exception as e:  # noqa: BLE001 - one line naming the topology and the fix
            raise app.UsageError(f"--topology={FLAGS.topology}: {str(e).splitlines()[0]} (is libtpu installed in "
                                 f".libtpu? see the README's test command)") from None
        if len(devices) != n_dev:
            raise app.UsageError(f"--topology={FLAGS.topology} has {len(devices)} chips but --mesh={FLAGS.mesh} "
                                 f"needs {n_dev}.")
        device_ctx = jax.default_device(devices[0])  # Mosaic's lowering reads the chip from the default device

    cfg = dsjax.Config.preset(FLAGS.config)
    if FLAGS.seq_len > cfg.max_position_embeddings:
        raise app.UsageError(f"--seq_len={FLAGS.seq_len} exceeds {FLAGS.config}'s max_position_embeddings="
                             f"{cfg.max_position_embeddings}: the model cannot be run there, so it is not planned.")
    if FLAGS.weights == "fp8":
        if FLAGS.mode == "train":
            raise app.UsageError("--weights=fp8 is for serving (prefill / decode); train keeps bf16 weights.")
        cfg = cfg.replace(fp8_weight_block=128)
    if FLAGS.topology and cfg.moe_impl == "auto":  # "auto" follows the default device (this CPU host)
        cfg = cfg.replace(moe_impl="ragged_dot")
    mesh = sharding.make_mesh(**sizes, devices=devices, config=cfg)
    batch_shards = math.prod(mesh.shape[a] for a in sharding.RULES["act_batch"])
    batch = FLAGS.batch or batch_shards
    step, args, in_sh, out_sh, donate, cats = build(FLAGS.mode, cfg, mesh, batch, FLAGS.seq_len, FLAGS.weights,
                                                    FLAGS.remat, FLAGS.ep_buffer_mb << 20,
                                                    FLAGS.ce_chunk_mb << 20 if FLAGS.ce_chunk_mb > 0 else None,
                                                    # TPU: the kernels' packed rows (init_cache's TPU default)
                                                    packed_cache=bool(FLAGS.topology)
                                                    and dsjax.cache.packed_supported(cfg)
                                                    and FLAGS.seq_len > cfg.index_topk)
    where = FLAGS.topology or "simulated CPU"
    print(f"plan: {FLAGS.config} mode={FLAGS.mode} weights={FLAGS.weights} mesh={FLAGS.mesh} ({n_dev} devices, {where}) "
          f"batch={batch} seq_len={FLAGS.seq_len} params={dsjax.count_params(args[0]) / 1e9:.1f}B", flush=True)
    t0 = time.time()
    with device_ctx:
        lowered = jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate).lower(*args)
        t1 = time.time()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # XLA:TPU refuses a program whose buffers exceed the chip's HBM: that is this plan's answer
            print(f"does not fit: {str(e).splitlines()[0].split('RESOURCE_EXHAUSTED: ')[-1]}")
            sys.exit(1)
    t2 = time.time()
    mem = compiled.memory_analysis()
    def part(where):  # an argument, or ("params" | "rest", i): the params of a state argument or the rest of it
        if isinstance(where, int):
            return args[where], in_sh[where]
        key, i = where
        pick = (lambda d: d["params"]) if key == "params" else (lambda d: {k: v for k, v in d.items() if k != "params"})
        return pick(args[i]), pick(in_sh[i])

    rows = [(name, per_device_bytes(*part(where))) for name, where in cats.items()]
    arg_total = mem.argument_size_in_bytes
    out_extra = mem.output_size_in_bytes - mem.alias_size_in_bytes
    temp = mem.temp_size_in_bytes
    total = arg_total + out_extra + temp
    print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print(f"{'per-device memory':<34}{'GB':>10}")
    for name, b in rows:
        print(f"  {name:<32}{b / GB:>10.2f}")
    print(f"  {'activations + workspace (temp)':<32}{temp / GB:>10.2f}")
    print(f"  {'outputs not aliased to inputs':<32}{out_extra / GB:>10.2f}")
    print(f"  {'total':<32}{total / GB:>10.2f}")
    fits = total <= FLAGS.hbm_gb * GB
    print(f"fits {FLAGS.hbm_gb:g} GB HBM: {'YES' if fits else 'NO'} ({100 * total / (FLAGS.hbm_gb * GB):.0f}%)")
    if FLAGS.row:
        print(readme_row(FLAGS.mode, FLAGS.weights, mesh, batch, FLAGS.seq_len, dict(rows), temp, total))
    print(f"memory_analysis: argument={arg_total / GB:.2f} GB (sum of the rows above: "
          f"{sum(b for _, b in rows) / GB:.2f}), output={mem.output_size_in_bytes / GB:.2f}, "
          f"alias={mem.alias_size_in_bytes / GB:.2f}, temp={temp / GB:.2f}, "
          f"code={mem.generated_code_size_in_bytes / 1e6:.1f} MB")


TARGETS = (("H200", 141.0), ("v5p", 95.0))  # the README table's "fits" column


def readme_row(mode, weights, mesh, batch, seq_len, rows, temp, total) -> str:
    """The plan as a row of the README's memory-plan table (per-device GB)."""
    def gb(name):
        return f"{rows[name] / GB:.2f}" if name in rows else "-"

    sizes = {a: n for a, n in mesh.shape.items() if n > 1}
    label = {"train": "train", "prefill": "prefill", "decode": "decode"}[mode]
    fits = " / ".join(f"{'yes' if total <= hbm * GB else 'no'} {100 * total / (hbm * GB):.0f}%" for _, hbm in TARGETS)
    return (f"| {label}, {batch} x {seq_len // 1024}K | {weights} | "
            f"{','.join(f'{a}={n}' for a, n in sizes.items())} ({mesh.size}) | {gb('params')} | "
            f"{gb('optimizer state')} | {gb('KV cache')} | {temp / GB:.2f} | {total / GB:.2f} | {fits} |")


if __name__ == "__main__":
    cli.run(main, "plan.py")
