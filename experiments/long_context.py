"""Long context on this CPU: a chunked DSA prefill of a small V3.2 and a sparse-stage training step, each at
several lengths, with time, compiled temp memory and peak RSS, to show memory linear in L (peers hold L×L).

    python experiments/long_context.py [--prefill_lengths=16384,32768,131072] [--train_lengths=8192,32768]

Prefill: `bench_utils.wide_dsa_config` (V3.2's attention / indexer width ratio of 17: 32 heads over a
256 + 32 latent, 8 indexer heads of 128; 2 layers) with index_topk = 2048, one sequence through `dsjax.generate` in chunks of `--prefill_chunk` tokens
(each chunk's queries attend over the latent cache through the indexer's top-2048), one new token.
Train: one `stage="sparse"` step (loss + grad + update) of the `tiny` preset at L tokens in one row.
Each measurement runs in its own process, so its peak RSS is its own. Prints one table per part.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import bench_utils  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("prefill_lengths", ["16384", "32768"], "Prompt lengths of the prefill part (131072 takes "
                  "tens of minutes on 2 cores).")
flags.DEFINE_list("train_lengths", ["8192", "32768"], "Token counts of the training-step part.")
flags.DEFINE_integer("prefill_chunk", 4096, "Prompt tokens per prefill chunk.")
flags.DEFINE_integer("index_topk", 2048, "index_topk of the prefill model.")
flags.DEFINE_string("_one", "", "Internal: run one measurement ('prefill:L' or 'train:L') and print JSON.")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _prefill(length: int) -> dict:
    import jax
    import numpy as np

    import dsjax
    from dsjax.generate import generate_with_stats

    cfg = bench_utils.wide_dsa_config(FLAGS.index_topk, max_position_embeddings=max(65536, length + 8))
    params = dsjax.init_params(cfg, jax.random.key(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, length).tolist()
    t0 = time.perf_counter()
    res = generate_with_stats(params, cfg, [prompt], max_new_tokens=1, prefill_chunk=FLAGS.prefill_chunk)
    out, stats = res.tokens, res.stats
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens_per_s": length / secs, "peak_rss_gb": _peak_rss_gb(),
            "chunks": -(-length // int(stats["prefill_chunk"])), "cache_len": int(stats["cache_len"]),
            "new_token": int(out[0][0]) if out[0] else None}


def _train(length: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsjax
    from dsjax.train import schedule, step as step_lib

    cfg = dsjax.Config.preset("tiny", max_position_embeddings=max(2048, length), num_nextn_predict_layers=0)
    tc = step_lib.TrainConfig(stage="sparse", optim=schedule.OptimConfig(warmup_steps=0, total_steps=10))
    state = step_lib.init_state(dsjax.init_params(cfg, jax.random.key(0)), cfg, tc, jax.random.key(1))
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, length)), jnp.int32)
    batch = {"tokens": tok, "targets": jnp.roll(tok, -1, axis=1), "weights": jnp.ones((1, length), jnp.float32),
             "segment_ids": jnp.zeros((1, length), jnp.int32),
             "positions": jnp.arange(length, dtype=jnp.int32)[None]}
    fn = step_lib.compiled_step(cfg, tc)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    secs = time.perf_counter() - t0
    return {"seconds": secs, "compile_s": t_compile, "temp_gb": temp / 2**30, "peak_rss_gb": _peak_rss_gb(),
            "loss": loss, "finite": bool(np.isfinite(loss))}


def _run_one(spec: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_one={spec}",
                           f"--prefill_chunk={FLAGS.prefill_chunk}", f"--index_topk={FLAGS.index_topk}"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    del argv
    if FLAGS._one:
        kind, n = FLAGS._one.split(":")
        print(json.dumps((_prefill if kind == "prefill" else _train)(int(n))))
        return
    if FLAGS.prefill_lengths:
        print(f"\n## Chunked DSA prefill: wide_dsa_config (width ratio 17), index_topk={FLAGS.index_topk}, "
              f"chunk {FLAGS.prefill_chunk}")
        print("| prompt tokens | time (s) | tokens/s | peak RSS (GB) |\n|---|---|---|---|")
        for n in FLAGS.prefill_lengths:
            r = _run_one(f"prefill:{n}")
            print(f"| {int(n):,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_gb']:.2f} |",
                  flush=True)
    if FLAGS.train_lengths:
        print("\n## One sparse-stage train step (loss + grad + update): preset tiny, one row")
        print("| tokens | step (s) | compile (s) | compiled temp (GB) | peak RSS (GB) | loss |\n|---|---|---|---|---|---|")
        for n in FLAGS.train_lengths:
            r = _run_one(f"train:{n}")
            print(f"| {int(n):,} | {r['seconds']:.1f} | {r['compile_s']:.1f} | {r['temp_gb']:.2f} | "
                  f"{r['peak_rss_gb']:.2f} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
