"""Forward-pass benchmark: dsjax (jit, XLA:CPU) against HF transformers (PyTorch eager) on the same weights
and tokens, and the DSA attention path against a dense-mask oracle at long L.

    python experiments/bench_forward.py [--config=small] [--batch=2] [--seq_len=512] [--dsa_lengths=4096,16384]

Table 1: tokens/s of a full forward (same config, batch, tokens), and the ratio dsjax / HF.
Table 2: the official-numerics mode's cost: the same FP8 block-quantised model (bf16 compute) with
`indexer_numerics="bf16"` (dequantised weights, bf16 matmuls: HF's numerics) and "official_fp8" (UE8M0
activation quantisation before every FP8 linear, latent FP8 round trip, FP8 indexer), tokens/s and ratio.
Table 4: the whole forward of one model at several L, with DSA (index_topk = `--crossover_topk`) and with
every key selected (index_topk >= L: the dense path, the same result). The model keeps V3.2's per-pair cost
ratio of attention to indexer, H·(2·C + Dr) / (Hi·Di) = 128·1088 / (64·128) = 17 (here H·544 / (H/4·128),
H = 32 and 64: `bench_utils.wide_dsa_config`), with a thin MoE, so attention dominates as it does at long L
in the real model. The indexer's top_k and the copies around attention do not grow with H, so the wider model
shows more of the real model's ratio.
Table 5: the XLA sparse MLA's two formulations (gathered rows; dense over all S keys with the top-k mask
applied inside each query chunk) at S / K around the crossover `method="auto"` switches at.
Table 3: one attention layer at L = 4K and 16K with index_topk = 2048 and the real head/latent sizes scaled
down: DSA (indexer top-k + gathered sparse MLA, O(L·k)) versus the dense-mask attention peers ship
(scores for all L×L pairs, masked to the same top-k; evaluated in query chunks so it fits in RAM).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import bench_utils  # noqa: E402
from experiments.bench_utils import best_time as _best  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "dsjax preset to benchmark.")
flags.DEFINE_integer("batch", 2, "Batch size of the full-model comparison.")
flags.DEFINE_integer("seq_len", 512, "Sequence length of the full-model comparison.")
flags.DEFINE_list("dsa_lengths", ["4096", "16384"], "Sequence lengths of the DSA-vs-dense table.")
flags.DEFINE_list("crossover_lengths", ["512", "1024", "2048", "4096", "8192"],
                  "Sequence lengths of the DSA-vs-every-key model table (table 4; empty to skip).")
flags.DEFINE_integer("crossover_topk", 256, "index_topk of table 4.")
flags.DEFINE_list("crossover_heads", ["32", "64"], "MLA heads of table 4's models (indexer heads: a quarter).")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (best is reported).")
flags.DEFINE_bool("skip_hf", False, "Skip the HF PyTorch comparison.")
flags.DEFINE_bool("numerics", True, "Time the official-numerics mode against the bf16 mode (table 2).")
flags.DEFINE_string("profile", None, "Write a profiler trace of the dsjax forward to this directory and print the "
                    "top named scopes by time.")


def full_model_table(cfg_name, batch, seq_len, repeats, skip_hf, profile_dir=None):
    import jax
    import numpy as np

    import checkpoints
    import dsjax

    cfg = dsjax.Config.preset(cfg_name)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len))
    rows = []
    if skip_hf:
        params = dsjax.init_params(cfg, jax.random.key(0))
    else:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        hf_cfg = AutoConfig.for_model(**cfg.to_hf())
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").float().eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            cfg_loaded, params = checkpoints.load_hf(d)
        cfg = cfg_loaded.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        tt = torch.as_tensor(tokens)

        def hf_run():
            with torch.no_grad():
                model(tt)

        t_hf = _best(hf_run, repeats)
        rows.append(("HF transformers (torch eager)", t_hf))
    run = lambda: dsjax.forward(params, tokens, cfg).block_until_ready()
    t_ds = _best(run, repeats)
    rows.insert(0, ("dsjax (jit, XLA:CPU)", t_ds))
    n_tok = batch * seq_len
    print(f"\n## Full forward: preset={cfg_name}, {dsjax.count_params(params) / 1e6:.1f}M params, "
          f"batch={batch}, seq_len={seq_len} (index_topk={cfg.index_topk}: DSA prunes={seq_len > cfg.index_topk})")
    print("| implementation | time (s) | tokens/s |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {n_tok / t:,.0f} |")
    if len(rows) == 2:
        print(f"| **ratio dsjax / HF (tokens/s)** | | **{rows[1][1] / rows[0][1]:.2f}x** |")
    if profile_dir:
        from dsjax import model as model_lib

        toks = jax.numpy.asarray(tokens, jax.numpy.int32)
        text = model_lib._forward_jit.lower(params, toks, cfg, None, None).compile().as_text()
        bench_utils.print_profile(f"forward, preset={cfg_name}, batch={batch}, seq_len={seq_len}",
                                  bench_utils.profile_scopes(run, [text], profile_dir))


def numerics_table(cfg_name, batch, seq_len, repeats):
    import jax
    import numpy as np

    import dsjax
    from checkpoints.synthetic import quantize_params

    # every FP8 linear input a multiple of the 128-block, as in the real model
    cfg = dsjax.Config.preset(cfg_name, dtype="bfloat16", param_dtype="bfloat16", fp8_weight_block=128)
    cfg = cfg.replace(**{f: -(-getattr(cfg, f) // 128) * 128 for f in ("q_lora_rank", "kv_lora_rank",
                                                                        "intermediate_size", "moe_intermediate_size")})
    params = jax.tree.map(jax.numpy.asarray, quantize_params(dsjax.init_params(cfg, jax.random.key(0)), cfg))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len))
    rows = []
    for mode in ("bf16", "official_fp8"):
        c = cfg.replace(indexer_numerics=mode)
        rows.append((mode, _best(lambda: dsjax.forward(params, tokens, c).block_until_ready(), repeats)))
    n_tok = batch * seq_len
    print(f"\n## Numerics modes: preset={cfg_name} with FP8 block-quantised weights, bf16 compute, batch={batch}, "
          f"seq_len={seq_len}")
    print("| indexer_numerics | time (s) | tokens/s |\n|---|---|---|")
    for mode, t in rows:
        print(f"| {mode} | {t:.3f} | {n_tok / t:,.0f} |")
    print(f"| **official_fp8 / bf16 (time)** | **{rows[1][1] / rows[0][1]:.2f}x** | |")


def dsa_table(lengths, repeats):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import reference as R

    b, h, c, dr, hi, di, topk = 1, 16, 128, 32, 8, 64, 2048
    print(f"\n## One attention layer: H={h}, latent={c}+{dr}, indexer {hi}x{di}, index_topk={topk}")
    print("| L | DSA indexer+sparse (s) | dense-mask oracle (s) | ratio dense/DSA | DSA attention only (s) |\n"
          "|---|---|---|---|---|")
    for length in lengths:
        ks = jax.random.split(jax.random.key(length), 7)
        qn = jax.random.normal(ks[0], (b, length, h, c))
        qr = jax.random.normal(ks[1], (b, length, h, dr))
        kvn = jax.random.normal(ks[2], (b, length, c))
        kr = jax.random.normal(ks[3], (b, length, dr))
        iq = jax.random.normal(ks[4], (b, length, hi, di))
        iw = jax.random.normal(ks[5], (b, length, hi))
        ik = jax.random.normal(ks[6], (b, length, di))
        pos = jnp.arange(length)[None]

        @jax.jit
        def dsa(qn, qr, kvn, kr, iq, iw, ik):
            idx = R.indexer_topk(iq, iw, ik, topk=topk, q_positions=pos)
            return R.sparse_mla(qn, qr, kvn, kr, idx, scale=0.1)

        @jax.jit
        def attn_only(qn, qr, kvn, kr, idx):
            return R.sparse_mla(qn, qr, kvn, kr, idx, scale=0.1)

        @jax.jit
        def dense_mask(qn, qr, kvn, kr, iq, iw, ik):
            # The peers' way: full indexer scores, a dense top-k mask, and attention over all L keys.
            idx = R.indexer_topk(iq, iw, ik, topk=topk, q_positions=pos)
            chunk = 256

            def step(_, x):
                qn_c, qr_c, idx_c = x
                return None, R.sparse_mla_dense_oracle(qn_c, qr_c, kvn, kr, idx_c, scale=0.1)

            xs = tuple(jnp.moveaxis(a.reshape((b, length // chunk, chunk) + a.shape[2:]), 1, 0) for a in (qn, qr, idx))
            _, out = jax.lax.scan(step, None, xs)
            return out

        args = (qn, qr, kvn, kr, iq, iw, ik)
        idx = jax.jit(lambda iq, iw, ik: R.indexer_topk(iq, iw, ik, topk=topk, q_positions=pos))(iq, iw, ik)
        t_dsa = _best(lambda: dsa(*args).block_until_ready(), repeats)
        t_dense = _best(lambda: dense_mask(*args).block_until_ready(), max(1, repeats - 2))
        t_attn = _best(lambda: attn_only(qn, qr, kvn, kr, idx).block_until_ready(), repeats)
        print(f"| {length} | {t_dsa:.2f} | {t_dense:.2f} | {t_dense / t_dsa:.2f}x | {t_attn:.2f} |")


def crossover_table(lengths, topk, repeats, heads=32):
    import jax
    import numpy as np

    import dsjax

    cfg = bench_utils.wide_dsa_config(topk, heads)
    params = dsjax.init_params(cfg, jax.random.key(0))
    c = cfg
    print(f"\n## DSA vs every key selected: the whole forward, batch 1, {dsjax.count_params(params) / 1e6:.1f}M "
          f"params, H={c.num_attention_heads} over a {c.kv_lora_rank}+{c.qk_rope_head_dim} latent, indexer "
          f"{c.index_n_heads}x{c.index_head_dim}, index_topk={topk}")
    print("| L | DSA (s) | every key (s) | ratio every-key / DSA |\n|---|---|---|---|")
    for length in lengths:
        tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, (1, length))
        times = []
        for k in (topk, max(topk, length)):  # index_topk >= L: every causal key, the dense path
            ck = cfg.replace(index_topk=k)
            times.append(_best(lambda: dsjax.forward(params, tokens, ck).block_until_ready(), repeats))
        dsa = times[0] if length > topk else float("nan")
        print(f"| {length} | {dsa:.3f} | {times[1]:.3f} | {times[1] / dsa:.2f}x |", flush=True)


def gather_crossover_table(topk, repeats):
    """Table 5: the two XLA sparse-MLA formulations at S / K near the crossover `method="auto"` uses."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import reference as R

    c = bench_utils.wide_dsa_config(topk)
    b, h, dc, dr = 1, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    print(f"\n## Sparse MLA on XLA:CPU, one layer: gathered rows vs dense with the top-k mask in the chunk "
          f"(H={h}, latent {dc}+{dr}, K={topk}; auto picks dense while S <= {R._GATHER_CROSSOVER}·K)")
    print("| S / K | S | gathered (s) | masked dense (s) | dense / gathered |\n|---|---|---|---|---|")
    for ratio in (1.5, 2, 3, 4):
        s_len = int(ratio * topk)
        ks = jax.random.split(jax.random.key(s_len), 5)
        qn, qr = jax.random.normal(ks[0], (b, s_len, h, dc)), jax.random.normal(ks[1], (b, s_len, h, dr))
        kvn, kr = jax.random.normal(ks[2], (b, s_len, dc)), jax.random.normal(ks[3], (b, s_len, dr))
        causal = jnp.arange(s_len)[None, :] <= jnp.arange(s_len)[:, None]
        idx = R.topk_indices(jnp.where(causal, jax.random.normal(ks[4], (s_len, s_len)), -jnp.inf), topk)[None]
        t = {}
        for m in ("gather", "dense"):
            f = jax.jit(lambda *a, m=m: R.sparse_mla(*a, scale=0.1, method=m))
            t[m] = _best(lambda: f(qn, qr, kvn, kr, idx).block_until_ready(), repeats)
        print(f"| {ratio:g} | {s_len} | {t['gather']:.3f} | {t['dense']:.3f} | {t['dense'] / t['gather']:.2f}x |")


def main(argv):
    del argv
    if FLAGS.profile:
        bench_utils.enable_op_tracing()  # before jax starts its backend
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    full_model_table(FLAGS.config, FLAGS.batch, FLAGS.seq_len, FLAGS.repeats, FLAGS.skip_hf, FLAGS.profile)
    if FLAGS.numerics:
        numerics_table(FLAGS.config, FLAGS.batch, FLAGS.seq_len, FLAGS.repeats)
    if FLAGS.crossover_lengths:
        for heads in FLAGS.crossover_heads:
            crossover_table([int(x) for x in FLAGS.crossover_lengths], FLAGS.crossover_topk, FLAGS.repeats,
                            int(heads))
        gather_crossover_table(FLAGS.crossover_topk, FLAGS.repeats)
    dsa_table([int(x) for x in FLAGS.dsa_lengths], FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
