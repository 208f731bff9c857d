"""Sparse MLA (DSA attention) benchmark: the XLA path against dense attention on any device, and the Pallas
kernels against the XLA path at the real DeepSeek V3.2 shapes on GPU / TPU.

    python experiments/bench_sparse_mla.py [--lengths=1024,2048,4096,8192] [--heads=16] [--dc=128] [--dr=32]
    python experiments/bench_sparse_mla.py --smoke   # runs the accelerator tables at toy sizes in interpret mode

Table 1 (every platform): one attention layer's forward at growing L with index_topk = 2048: the XLA
sparse gather (`reference.sparse_mla`, O(L·k)) against dense causal attention (`reference.dense_mla`,
O(L²), the cost of the dense-mask "DSA" peers ship). Columns: time, ratio dense/sparse, and the scaling
exponent from the previous row (2 = quadratic, 1 = linear).
Table 2 (GPU): TFLOPS and % of bf16 peak of the Triton kernels at H = 128, Dc = 512, Dr = 64, K = 2048 for
prefill forward, decode (T = 1, batch 64 and 128) and backward, with the XLA path measured in the same run
(FLOPs = 2·H·K·(Dc+Dr+Dc) per query forward, 2·H·K·(3·(Dc+Dr)+2·Dc) ≈ 2.5x backward; reference point:
FlashMLA sparse prefill 640 TFLOPS on H800). `--sweep` adds a block-size sweep of the forward/backward.
Table 3 (TPU): AOT cost analysis (and timing) of the Mosaic kernels at the same shapes.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.bench_utils import best_time as _best  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "Sequence lengths of table 1.")
flags.DEFINE_integer("topk", 2048, "index_topk of table 1.")
flags.DEFINE_integer("heads", 16, "Query heads of table 1 (the real model has 128).")
flags.DEFINE_integer("dc", 128, "Latent (nope) width of table 1 (the real model has 512).")
flags.DEFINE_integer("dr", 32, "Rotary width of table 1 (the real model has 64).")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (best is reported).")
flags.DEFINE_integer("prefill_len", 4096, "Query tokens of the accelerator prefill/backward rows.")
flags.DEFINE_integer("kv_len", 32768, "Keys per sequence of the accelerator rows (indices are drawn from them).")
flags.DEFINE_list("decode_batches", ["64", "128"], "Batch sizes of the decode rows (T = 1).")
flags.DEFINE_bool("sweep", False, "GPU: also sweep block sizes / warps / stages.")
flags.DEFINE_bool("smoke", False, "Run tables 2-3 at toy sizes in interpret mode (checks the script on CPU).")
flags.DEFINE_bool("skip_table1", False, "Skip the XLA sparse-vs-dense table.")

# Dense bf16 tensor-core peaks (public spec sheets), by substring of jax's device_kind.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0,
               "GB200": 2500.0, "L40S": 362.0}


def _causal_topk_indices(rng, b, t, s, k):
    """Per query t' (at position s - t + t'), k distinct-ish random visible keys, -1 when fewer are visible
    (the indexer's output shape; the values do not change the cost)."""
    import numpy as np

    pos = (s - t + np.arange(t))[:, None]
    idx = rng.integers(0, 1 << 30, (b, t, k)) % (pos + 1)
    return np.where(np.arange(k)[None, None] <= pos, idx, -1).astype(np.int32)


def _inputs(b, t, s, h, dc, dr, k, dtype, seed=0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return (arr(b, t, h, dc), arr(b, t, h, dr), arr(b, s, dc), arr(b, s, dr),
            jnp.asarray(_causal_topk_indices(rng, b, t, s, k)))


# ----------------------------------------------------------------------------- table 1
def table_xla_sparse_vs_dense(lengths, topk, h, dc, dr, repeats):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import reference as R

    scale = 1.0 / math.sqrt(dc + dr)
    sparse = jax.jit(lambda qn, qr, kvn, kr, idx, c=None: R.sparse_mla(qn, qr, kvn, kr, idx, scale=scale,
                                                                         chunk_size=c), static_argnums=5)
    dense = jax.jit(lambda qn, qr, kvn, kr: R.dense_mla(qn, qr, kvn, kr, scale=scale))
    print(f"\n## XLA sparse MLA vs dense causal attention ({jax.default_backend()}): forward, B=1, H={h}, "
          f"Dc={dc}, Dr={dr}, index_topk={topk}, f32")
    print("| L | XLA sparse (s) | same, 128 MiB chunks (before) (s) | dense (s) | dense / sparse "
          "| sparse scaling | dense scaling |")
    print("|---|---|---|---|---|---|---|")
    prev = None
    for length in lengths:
        k = min(topk, length)
        qn, qr, kvn, kr, idx = _inputs(1, length, length, h, dc, dr, k, jnp.float32)
        old_chunk = R.auto_chunk(length, h * k * 4 * 3 + k * (dc + dr) * 4, 256)  # the former default
        t_s = _best(lambda: sparse(qn, qr, kvn, kr, idx).block_until_ready(), repeats)
        t_old = _best(lambda: sparse(qn, qr, kvn, kr, idx, old_chunk).block_until_ready(), repeats)
        t_d = _best(lambda: dense(qn, qr, kvn, kr).block_until_ready(), repeats)
        if prev is None:
            exps = ("–", "–")
        else:
            f = math.log(length / prev[0])
            exps = (f"{math.log(t_s / prev[1]) / f:.2f}", f"{math.log(t_d / prev[2]) / f:.2f}")
        print(f"| {length} | {t_s:.3f} | {t_old:.3f} | {t_d:.3f} | {t_d / t_s:.2f} | {exps[0]} | {exps[1]} |",
              flush=True)
        prev = (length, t_s, t_d)


# ----------------------------------------------------------------------------- accelerator tables
def _cases(smoke):
    """(name, B, T, S, backward) at the real shapes (or toy shapes for --smoke)."""
    if smoke:
        return dict(h=16, dc=64, dr=16, k=64), [("prefill fwd", 1, 32, 128, False), ("decode", 4, 1, 128, False),
                                                  ("prefill bwd", 1, 32, 128, True)]
    dims = dict(h=128, dc=512, dr=64, k=2048)
    s, t = FLAGS.kv_len, FLAGS.prefill_len
    rows = [("prefill fwd", 1, t, s, False)]
    rows += [(f"decode B={b}", int(b), 1, s, False) for b in FLAGS.decode_batches]
    rows.append(("prefill bwd", 1, t, s, True))
    return dims, rows


def _op(module, backward, scale, interpret, **kw):
    """Jitted forward, or forward + backward given the saved (out, lse), of one implementation."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import reference as R

    if module is None:  # XLA reference: its own custom_vjp
        if not backward:
            return jax.jit(lambda *a: R.sparse_mla_with_lse(*a, scale=scale)[0])
        return jax.jit(lambda qn, qr, kvn, kr, idx, do: jax.vjp(
            lambda *x: R.sparse_mla(*x, idx, scale=scale), qn, qr, kvn, kr)[1](do))
    if not backward:
        return jax.jit(lambda *a: module.forward(*a, scale=scale, interpret=interpret, **kw)[0])

    def bwd(qn, qr, kvn, kr, idx, do, out, lse):
        return module.backward(qn, qr, kvn, kr, idx, out, lse, do, jnp.zeros(lse.shape, jnp.float32),
                               scale=scale, interpret=interpret, **kw)

    return jax.jit(bwd)


def table_accelerator(platform, smoke, repeats, sweep):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import sparse_mla_common, sparse_mla_gpu, sparse_mla_tpu

    module = {"gpu": sparse_mla_gpu, "tpu": sparse_mla_tpu}[platform]
    interpret = smoke
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    dims, rows = _cases(smoke)
    h, dc, dr, k = dims["h"], dims["dc"], dims["dr"], dims["k"]
    scale = 1.0 / math.sqrt(dc + dr)
    dtype = jnp.bfloat16
    print(f"\n## Pallas sparse MLA on {kind} ({platform}{', interpret smoke run' if smoke else ''}): "
          f"H={h}, Dc={dc}, Dr={dr}, K={k}, bf16 (peak {peak or 'n/a'} TFLOPS)")
    print("| case | impl | time (ms) | TFLOPS | % peak | kernel / XLA speed-up |")
    print("|---|---|---|---|---|---|")
    configs = [{}]
    if sweep and platform == "gpu":
        configs += [dict(block_h=bh, block_k=bk, num_warps=w, num_stages=st)
                    for bh, bk, w, st in ((64, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 3),
                                          (64, 16, 4, 2), (128, 32, 8, 2))]
    for name, b, t, s, backward in rows:
        qn, qr, kvn, kr, idx = _inputs(b, t, s, h, dc, dr, k, dtype)
        idx = jnp.where(idx >= 0, idx, jnp.arange(k, dtype=jnp.int32) % s)  # every slot valid: FLOPs as counted
        flops = sparse_mla_common.flops(b, t, h, k, dc, dr, backward)
        extra = ()
        if backward:
            do = jnp.ones(qn.shape, dtype)
            out, lse = module.forward(qn, qr, kvn, kr, idx, scale=scale, interpret=interpret)
            extra = (do, out, lse)
        try:
            xla = _op(None, backward, scale, interpret)
            t_xla = _best(lambda: jax.block_until_ready(xla(qn, qr, kvn, kr, idx, *extra[:1])), repeats)
        except Exception as e:  # e.g. out of memory at large T
            print(f"| {name} | XLA | failed: {type(e).__name__} | | | |")
            t_xla = None
        _row(name, "XLA", t_xla, flops, peak, None)
        for cfg in configs:
            if backward and cfg:
                cfg = {key: v for key, v in cfg.items() if key != "num_stages"}
            label = "Pallas " + ("default" if not cfg else ",".join(f"{a}={v}" for a, v in cfg.items()))
            try:
                fn = _op(module, backward, scale, interpret, **cfg)
                t_k = _best(lambda: jax.block_until_ready(fn(qn, qr, kvn, kr, idx, *extra)), repeats)
            except Exception as e:  # a sweep point can exceed shared memory / registers
                print(f"| {name} | {label} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                continue
            _row(name, label, t_k, flops, peak, t_xla)
        if platform == "tpu":
            _cost_analysis(module, backward, scale, interpret, (qn, qr, kvn, kr, idx, *extra), name)


def _row(name, label, secs, flops, peak, t_ref):
    if secs is None:
        return
    tf = flops / secs / 1e12
    pct = f"{100 * tf / peak:.1f}" if peak else "n/a"
    ratio = f"{t_ref / secs:.2f}x" if t_ref else "–"
    print(f"| {name} | {label} | {secs * 1e3:.3f} | {tf:.1f} | {pct} | {ratio} |", flush=True)


def _cost_analysis(module, backward, scale, interpret, args, name):
    """XLA's AOT cost analysis of the compiled kernel call (Pallas passes our CostEstimate through)."""
    fn = _op(module, backward, scale, interpret)
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    keys = ("flops", "transcendentals", "bytes accessed")
    print(f"|   {name} AOT cost | " + ", ".join(f"{k}={cost.get(k, float('nan')):.3g}" for k in keys)
          + " | | | | |")


def main(argv):
    del argv
    import jax

    if not FLAGS.skip_table1 and not FLAGS.smoke:
        table_xla_sparse_vs_dense([int(x) for x in FLAGS.lengths], FLAGS.topk, FLAGS.heads, FLAGS.dc, FLAGS.dr,
                                  FLAGS.repeats)
    if FLAGS.smoke:
        for platform in ("gpu", "tpu"):
            table_accelerator(platform, True, 1, FLAGS.sweep)
    elif jax.default_backend() in ("gpu", "tpu"):
        table_accelerator(jax.default_backend(), False, FLAGS.repeats, FLAGS.sweep)
    else:
        print(f"\nNo GPU/TPU ({jax.default_backend()}): Pallas kernel tables skipped "
              "(--smoke runs them at toy sizes in interpret mode).")


if __name__ == "__main__":
    app.run(main)
