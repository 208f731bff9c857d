"""Lightning-indexer benchmark: dsjax's chunked indexer top-k against the naive materialising indexer
(the whole [T, Hi, S] per-head logits and [T, S] scores at once, as peers do), measured in the same run;
the Pallas kernels' TFLOPS on an accelerator; and the index-set overlap of the bf16 and official-FP8
numerics.

    python experiments/bench_indexer.py [--lengths=8192,16384,32768] [--queries=512]

Table 1 (any platform): one top-k step of `queries` query rows against L keys at the real indexer shape
(Hi = 64, Di = 128, k = 2048): the last `queries` tokens of an L-token prefill, i.e. one chunk of a
chunked prefill. Peak memory is XLA's buffer plan for the compiled step (arguments + temporaries +
outputs); time is the best of `repeats` after compilation. The naive one is only run when its plan fits
under --naive_max_gib; otherwise its memory is still reported from the plan.
Table 2 (GPU / TPU only): the Pallas score kernel on a full causal prefill, TFLOPS (causal FLOPs
2·Hi·Di·L(L+1)/2 per sequence) and % of the chip's dense bf16 peak, against XLA on the same chip.
Table 3: mean / min Jaccard overlap of the top-2048 sets of the bf16 and official-FP8 numerics on random
data at 8K keys (spec §5.8).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.bench_utils import best_time as _best  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["8192", "16384", "32768"], "Key counts L of table 1 (and table 2 on GPU/TPU).")
flags.DEFINE_integer("queries", 512, "Query rows per top-k step in table 1.")
flags.DEFINE_integer("heads", 64, "Indexer heads Hi.")
flags.DEFINE_integer("head_dim", 128, "Indexer head dim Di.")
flags.DEFINE_integer("topk", 2048, "Selected keys per query.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions (best is reported).")
flags.DEFINE_float("naive_max_gib", 2.5, "Run the naive indexer only when its buffer plan fits in this many GiB.")
flags.DEFINE_float("peak_tflops", 0.0, "Dense bf16 peak of the accelerator for %-of-peak (0: from the device kind).")
flags.DEFINE_integer("jaccard_queries", 64, "Queries of the Jaccard measurement (table 3).")
flags.DEFINE_bool("skip_jaccard", False, "Skip table 3.")

# dense bf16 peak TFLOPS per chip (public specs; TPU figures from JAX's tpu_info table)
_PEAKS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0,
          "v5 lite": 197.0, "v5e": 197.0, "v5p": 459.0, "v6": 918.0, "v7": 2307.0}


def _plan_gib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / 2 ** 30


def _inputs(key, b, t, s, hi, di, dtype):
    import jax

    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (b, t, hi, di), dtype)
    w = jax.random.normal(ks[1], (b, t, hi)) * (hi ** -0.5 * di ** -0.5)
    k = jax.random.normal(ks[2], (b, s, di), dtype)
    return q, w, k


def topk_table(lengths, queries, hi, di, topk, repeats, naive_max_gib):
    import jax
    import jax.numpy as jnp

    import pallas_kernels
    from pallas_kernels import reference as R

    backend = {"cpu": "xla"}.get(jax.default_backend())  # None: the platform's Pallas kernel
    print(f"\n## Indexer top-k step: {queries} queries x L keys, Hi={hi}, Di={di}, k={topk}, "
          f"platform={jax.default_backend()}, dsjax backend={pallas_kernels.resolve_backend(backend)}")
    print("| L | dsjax chunked (s) | naive (s) | time naive/dsjax | dsjax peak (GiB) | naive peak (GiB) "
          "| memory naive/dsjax |\n|---|---|---|---|---|---|---|")
    for length in lengths:
        q, w, k = _inputs(jax.random.key(length), 1, queries, length, hi, di, jnp.float32)
        pos = jnp.arange(length - queries, length)

        def ours(q, w, k):
            return pallas_kernels.indexer_topk(q, w, k, topk=topk, q_positions=pos, backend=backend)

        def naive(q, w, k):
            return R.topk_indices(R.indexer_scores_naive(q, w, k, q_positions=pos), topk)

        c_ours = jax.jit(ours).lower(q, w, k).compile()
        c_naive = jax.jit(naive).lower(q, w, k).compile()
        m_ours, m_naive = _plan_gib(c_ours), _plan_gib(c_naive)
        t_ours = _best(lambda: c_ours(q, w, k).block_until_ready(), repeats)
        if m_naive <= naive_max_gib:
            t_naive = _best(lambda: c_naive(q, w, k).block_until_ready(), repeats)
            tn, ratio = f"{t_naive:.2f}", f"{t_naive / t_ours:.2f}x"
            same = bool(jnp.all(jnp.sort(c_naive(q, w, k), -1) == jnp.sort(c_ours(q, w, k), -1)))
            tn += "" if same else " (sets differ!)"
        else:
            tn, ratio = f"not run (> {naive_max_gib:g} GiB)", "-"
        print(f"| {length} | {t_ours:.2f} | {tn} | {ratio} | {m_ours:.2f} | {m_naive:.2f} | {m_naive / m_ours:.1f}x |")


def kernel_table(lengths, hi, di, repeats, peak):
    import jax
    import jax.numpy as jnp

    import pallas_kernels

    kind = jax.devices()[0].device_kind
    if not peak:
        peak = next((v for k, v in _PEAKS.items() if k.lower() in kind.lower()), 0.0)
    print(f"\n## Pallas score kernel, full causal prefill, bf16, Hi={hi}, Di={di} on {kind} "
          f"(peak {peak or '?'} TFLOPS)")
    print("| L | Pallas (ms) | TFLOPS | % of peak | XLA (ms) | XLA/Pallas |\n|---|---|---|---|---|---|")
    for length in lengths:
        q, w, k = _inputs(jax.random.key(length), 1, length, length, hi, di, jnp.bfloat16)
        pos = jnp.arange(length)
        f = {b: jax.jit(lambda q, w, k, b=b: pallas_kernels.indexer_scores(q, w, k, q_positions=pos, backend=b))
             for b in (None, "xla")}
        t_k = _best(lambda: f[None](q, w, k).block_until_ready(), repeats)
        t_x = _best(lambda: f["xla"](q, w, k).block_until_ready(), repeats)
        tflops = 2 * hi * di * length * (length + 1) / 2 / t_k / 1e12
        pct = f"{100 * tflops / peak:.1f}%" if peak else "?"
        print(f"| {length} | {t_k * 1e3:.2f} | {tflops:.1f} | {pct} | {t_x * 1e3:.2f} | {t_x / t_k:.2f}x |")


def jaccard_table(queries, hi, di, topk, seed=0):
    import jax.numpy as jnp
    import numpy as np

    from dsjax import indexer

    s = 8192
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, queries, hi, di)), jnp.bfloat16)
    kf = rng.standard_normal((1, s, di)).astype(np.float32)
    kf[..., :4] *= 8.0  # a few outlier channels, as in real activations
    w = jnp.asarray(rng.standard_normal((1, queries, hi)), jnp.float32) * (hi ** -0.5 * di ** -0.5)
    jac = np.asarray(indexer.numerics_overlap(q, w, jnp.asarray(kf, jnp.bfloat16), topk=topk,
                                              q_positions=jnp.arange(s - queries, s)))
    print(f"\n## Index-set overlap, bf16 (HF) vs official FP8 numerics: S={s} keys, last {queries} queries, "
          f"Hi={hi}, Di={di}, k={topk}, random Gaussian q/k (bf16) with 4 outlier key channels")
    print(f"| mean Jaccard | min Jaccard |\n|---|---|\n| {jac.mean():.4f} | {jac.min():.4f} |")


def main(argv):
    del argv
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPU cores")
    lengths = [int(x) for x in FLAGS.lengths]
    topk_table(lengths, FLAGS.queries, FLAGS.heads, FLAGS.head_dim, FLAGS.topk, FLAGS.repeats, FLAGS.naive_max_gib)
    if jax.default_backend() in ("gpu", "tpu"):
        kernel_table(lengths, FLAGS.heads, FLAGS.head_dim, FLAGS.repeats, FLAGS.peak_tflops)
    else:
        print("\n(no GPU/TPU: the Pallas kernels' TFLOPS table needs an accelerator; interpret mode on CPU "
              "measures the interpreter, not the kernel)")
    if not FLAGS.skip_jaccard:
        jaccard_table(FLAGS.jaccard_queries, FLAGS.heads, FLAGS.head_dim, FLAGS.topk)


if __name__ == "__main__":
    app.run(main)
