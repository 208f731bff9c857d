"""GPU device benchmark, ready to run in one call: each GPU kernel checked against the XLA reference and timed,
the whole model's forward and decode step, against the peak bf16 matmul and an HBM copy measured in the same run.

    python experiments/bench_gpu.py                 # on a GPU: the real V3.2 kernel shapes (< 5 min on an H200)
    python experiments/bench_gpu.py --small --interpret   # anywhere: small shapes, kernels in interpret mode

Table 1, the roofline anchors measured here: a bf16 matmul (TFLOP/s) and a device copy (GB/s).
Table 2, per kernel (sparse MLA prefill forward, backward, decode; indexer scores): max |Δ| against the XLA
path on the same inputs, time, TFLOP/s (FlashMLA's count for sparse MLA: 2·H·K·(Dc + Dr + Dc) per token;
tilelang's five matmuls for the backward) and % of the measured matmul peak, HBM GB/s (gathered rows + q/o)
and % of the measured copy. Published anchors (H800): FlashMLA sparse prefill 640 TFLOP/s, sparse decode
410 TFLOP/s (FP8 cache); tilelang sparse backward 100-115 TFLOP/s.
Table 3: the whole model (the "small" preset widened to the kernel shapes, bf16) forward over a prefill and
one decode step over a filled cache, with the XLA path in the same run.
tests/test_bench_gpu.py runs `--small --interpret` on CPU so the script cannot rot.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import dsjax  # noqa: E402
import pallas_kernels  # noqa: E402
from experiments.bench_utils import best_time  # noqa: E402
from pallas_kernels.sparse_mla_common import flops as mla_flops  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "Small shapes (CPU / interpret mode); default: the real V3.2 kernel shapes.")
flags.DEFINE_bool("interpret", False, "Run the Pallas kernels in interpret mode (no GPU needed).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (best is reported).")
flags.DEFINE_bool("skip_model", False, "Skip table 3.")

BF16, F32 = jnp.bfloat16, jnp.float32


def _block(x):
    return jax.block_until_ready(x)


def anchors(small: bool, repeats: int) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device copy B/s) measured on the default device."""
    n = 512 if small else 8192
    a = jnp.ones((n, n), BF16)
    mm = jax.jit(lambda x: x @ x)
    t = best_time(lambda: _block(mm(a)), repeats)
    m = (1 << 20) if small else (1 << 30)  # bytes
    x = jnp.ones((m // 4,), F32)
    cp = jax.jit(lambda v: v + 1.0)  # one read + one write
    tc = best_time(lambda: _block(cp(x)), repeats)
    return 2 * n ** 3 / t, 2 * m / tc


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    fin = np.isfinite(ref)
    diff = np.where(fin, got, 0) - np.where(fin, ref, 0)
    return float(np.abs(diff).max() / max(1e-6, np.abs(np.where(fin, ref, 0)).max()))


def kernel_rows(small: bool, interpret: bool, repeats: int, peak: float, bw: float) -> list[tuple]:
    rng = np.random.default_rng(0)
    h, dc, dr, k = (16, 256, 64, 64) if small else (128, 512, 64, 2048)
    t, s = (64, 256) if small else (4096, 8192)
    bd, sd = (4, 256) if small else (64, 32768)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.5, BF16)

    def causal_idx(b, t, s, off):
        # the top-k of random scores among each query's causal keys, valid first (as the indexer emits)
        sc = rng.uniform(size=(b, t, s)).astype(np.float32)
        pos = np.arange(t)[:, None] + off
        sc = np.where(np.arange(s)[None, :] <= pos, sc, -np.inf)
        idx = np.argsort(-sc, axis=-1)[..., :k]
        return jnp.asarray(np.where(np.take_along_axis(sc, idx, -1) > -np.inf, idx, -1).astype(np.int32))

    rows = []
    kw = dict(scale=0.1, prefix_valid=True)
    gpu = functools.partial(pallas_kernels.sparse_mla_with_lse, backend="pallas_gpu", interpret=interpret, **kw)
    xla = functools.partial(pallas_kernels.sparse_mla_with_lse, backend="xla", **kw)
    for name, b, tt, ss in (("sparse MLA prefill fwd", 1, t, s), ("sparse MLA decode", bd, 1, sd)):
        args = (arr(b, tt, h, dc), arr(b, tt, h, dr), arr(b, ss, dc), arr(b, ss, dr), causal_idx(b, tt, ss, ss - tt))
        fk, fx = jax.jit(gpu), jax.jit(xla)
        err = _rel_err(fk(*args)[0], fx(*args)[0])
        sec = best_time(lambda: _block(fk(*args)), repeats)
        fl = mla_flops(b, tt, h, k, dc, dr)
        by = b * tt * k * (dc + dr) * 2 + b * tt * h * (2 * dc + dr) * 2
        rows.append((name, err, sec, fl / sec, by / sec))
    # backward (through the public op's custom_vjp)
    args = (arr(1, t, h, dc), arr(1, t, h, dr), arr(1, s, dc), arr(1, s, dr), causal_idx(1, t, s, s - t))

    def loss(fn, *x):
        o, _ = fn(*x, args[4])
        return jnp.sum(o.astype(F32) * 1e-3)

    gk = jax.jit(jax.grad(functools.partial(loss, gpu), argnums=(0, 1, 2, 3)))
    gx = jax.jit(jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2, 3)))
    err = max(_rel_err(a, b) for a, b in zip(gk(*args[:4]), gx(*args[:4])))
    sec = best_time(lambda: _block(gk(*args[:4])), repeats)
    fl = mla_flops(1, t, h, k, dc, dr) + mla_flops(1, t, h, k, dc, dr, backward=True)
    rows.append(("sparse MLA fwd+bwd", err, sec, fl / sec, 3 * 1 * t * k * (dc + dr) * 2 / sec))
    # indexer scores (the kernel behind top-k)
    hi, di = (8, 64) if small else (64, 128)
    q, w, kk = arr(1, t, hi, di), jnp.asarray(rng.uniform(size=(1, t, hi)), F32), arr(1, s, di)
    pos = jnp.arange(s - t, s)
    ik = jax.jit(lambda q, w, kk: pallas_kernels.indexer_scores(q, w, kk, q_positions=pos, backend="pallas_gpu",
                                                                interpret=interpret))
    ix = jax.jit(lambda q, w, kk: pallas_kernels.indexer_scores(q, w, kk, q_positions=pos, backend="xla"))
    err = _rel_err(ik(q, w, kk), ix(q, w, kk))
    sec = best_time(lambda: _block(ik(q, w, kk)), repeats)
    fl = 2 * t * hi * di * s  # every tile (the kernel skips the causal future; this counts them all)
    rows.append(("indexer scores", err, sec, fl / sec, (t * s * 4 + s * di * 2) / sec))
    return [(n, e, sec, f, b_, 100 * f / peak, 100 * b_ / bw) for n, e, sec, f, b_ in rows]


def model_rows(small: bool, interpret: bool, repeats: int) -> list[tuple]:
    cfg = dsjax.Config.preset("tiny" if small else "small", kv_lora_rank=256, qk_rope_head_dim=64,
                              index_head_dim=64, index_topk=32 if small else 256, dtype="bfloat16")
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape).astype(np.float32), a.dtype),
                          dsjax.abstract_params(cfg))
    b, t = (2, 64) if small else (8, 2048)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    rows = []
    for backend in ("pallas_gpu", "xla"):
        c = cfg.replace(attention_backend=backend, indexer_backend=backend, kernel_interpret=interpret)
        fwd = jax.jit(lambda p, x, c=c: dsjax.forward(p, x, c))
        sec_f = best_time(lambda: _block(fwd(params, tokens)), repeats)
        cache = dsjax.cache.layer_caches(dsjax.cache.init_cache(c, b, t + 8))

        @functools.partial(jax.jit, donate_argnums=(1,))
        def step(p, cache, tok, pos, c=c):
            aux = dsjax.model.forward_hidden(p, tok, c, positions=pos, cache=cache)
            return dsjax.model.lm_head(p, aux.hidden), aux.cache

        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        _, cache = step(params, cache, tokens, pos)
        one, p1 = tokens[:, :1], jnp.full((b, 1), t, jnp.int32)
        state = {"cache": cache}

        def decode():
            logits, state["cache"] = step(params, state["cache"], one, p1)
            _block(logits)

        rows.append((backend, sec_f, b * t / sec_f, best_time(decode, repeats)))
    return rows


def main(argv) -> None:
    del argv
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not FLAGS.interpret:
        print(f"no GPU here ({dev.platform}): run with --small --interpret to exercise the script.", file=sys.stderr)
        sys.exit(2)
    peak, bw = anchors(FLAGS.small, FLAGS.repeats)
    print(f"## anchors on {dev.device_kind}: bf16 matmul {peak / 1e12:.1f} TFLOP/s, copy {bw / 1e9:.1f} GB/s")
    print("\n## kernels vs the XLA path (same inputs)")
    print(f"{'kernel':26} {'max rel err':>11} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'GB/s':>8} {'% copy':>7}")
    for n, e, sec, f, b_, pf, pb in kernel_rows(FLAGS.small, FLAGS.interpret, FLAGS.repeats, peak, bw):
        print(f"{n:26} {e:11.2e} {sec * 1e3:9.3f} {f / 1e12:8.2f} {pf:7.1f} {b_ / 1e9:8.1f} {pb:7.1f}")
    print("anchors (H800, published): FlashMLA sparse prefill 640, sparse decode 410 (FP8), tilelang bwd 100-115")
    if not FLAGS.skip_model:
        print("\n## whole model (bf16): forward over the prefill, one decode step over the filled cache")
        rows = model_rows(FLAGS.small, FLAGS.interpret, FLAGS.repeats)
        print(f"{'attention':12} {'forward s':>10} {'tok/s':>10} {'decode ms':>10}")
        for backend, sf, tps, sd in rows:
            print(f"{backend:12} {sf:10.3f} {tps:10.0f} {sd * 1e3:10.2f}")
        print(f"kernel / XLA: forward {rows[1][1] / rows[0][1]:.2f}x, decode {rows[1][3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    app.run(main)
