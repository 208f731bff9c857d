"""Training-step benchmark: dsjax (jit, XLA:CPU, optax AdamW) against HF transformers + torch AdamW, on the
same config, weights, batch and sequence, with MFU against a matmul peak measured in the same run.

    python experiments/bench_train.py [--config=tiny] [--batch=8] [--seq_len=256] [--index_topk=64]

Both sides train next-token cross-entropy on the same random tokens with AdamW and global-norm clipping, in
fp32, no MTP (HF has none), no balance loss / bias update, no rematerialisation (HF stores activations too);
one extra dsjax row shows the default remat="full". The DSA top-k prunes when seq_len > index_topk (HF applies
it as a dense L x L mask, dsjax as gathered sparse attention).

Model FLOPs (the same count for both rows): 3 x forward, forward = 2 x (active matmul weights per token +
attention over the keys each query really sees (min(position + 1, index_topk)) + the indexer's scores over
all causal keys). MFU = achieved model FLOP/s / peak, the peak being the best of a 2048^3 fp32 matmul in
jax and in torch on this machine, measured in this run.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from experiments import bench_utils  # noqa: E402
from experiments.bench_utils import best_time  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "dsjax preset")
flags.DEFINE_integer("vocab_size", 2048, "vocabulary (the presets' tiny 512 under-weights the head)")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("seq_len", 256, "tokens per row")
flags.DEFINE_integer("index_topk", 64, "DSA top-k (< seq_len: DSA prunes)")
flags.DEFINE_integer("steps", 5, "timed steps per implementation (median reported)")
flags.DEFINE_bool("skip_hf", False, "skip the HF / torch rows")
flags.DEFINE_string("profile", None, "write a profiler trace of the dsjax step (remat=full) to this directory and "
                    "print the top named scopes by time")


def peak_flops() -> dict[str, float]:
    """Best-of matmul FLOP/s of a 2048^3 fp32 product in jax and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    out = {"jax": 2 * n ** 3 / best_time(lambda: f(a).block_until_ready(), 5)}
    try:
        import torch

        t = torch.randn(n, n)
        out["torch"] = 2 * n ** 3 / best_time(lambda: t @ t, 5)
    except ImportError:
        pass
    return out


def model_flops_per_step(c, batch: int, seq_len: int) -> float:
    """3 x forward model FLOPs of one training step (see the module docstring)."""
    d, h, v = c.hidden_size, c.num_attention_heads, c.vocab_size
    dqk, dv, r, dr = c.qk_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    q = d * c.q_lora_rank + c.q_lora_rank * h * dqk if c.q_lora_rank else d * h * dqk
    attn_w = q + d * (r + dr) + r * h * (c.qk_nope_head_dim + dv) + h * dv * d
    idx_w = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + d * c.index_head_dim + d * c.index_n_heads
             if c.has_indexer else 0)
    dense_w = 3 * d * c.intermediate_size
    moe_w = 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) + d * c.n_routed_experts
    per_token_w = (c.num_hidden_layers * (attn_w + idx_w) + c.n_dense_layers * dense_w + c.n_moe_layers * moe_w
                   + d * v)
    pos = range(seq_len)
    seen = sum(min(p + 1, c.index_topk) if c.has_indexer else p + 1 for p in pos) / seq_len
    causal = sum(p + 1 for p in pos) / seq_len
    per_token_attn = c.num_hidden_layers * (h * (dqk + dv) * seen
                                            + (c.index_n_heads * c.index_head_dim * causal if c.has_indexer else 0))
    return 3 * 2 * (per_token_w + per_token_attn) * batch * seq_len


def bench_dsjax(cfg, params, tokens, remat, steps, profile_dir=None):
    import jax
    import numpy as np

    from dsjax.train import OptimConfig, TrainConfig, compiled_step, init_state

    tc = TrainConfig(remat=remat, mtp_weight=0.0, balance_alpha=0.0, bias_update_rate=0.0,
                     optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1000, weight_decay=0.1))
    b, l = tokens.shape[0], tokens.shape[1] - 1
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, l), np.float32),
             "segment_ids": np.ones((b, l), np.int32), "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1))}
    state = init_state(jax.tree.map(lambda x: x.copy(), params), cfg, tc, jax.random.key(0))
    fn = compiled_step(cfg, tc)
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    if profile_dir:
        holder = {"state": state}

        def run():
            holder["state"], out = fn(holder["state"], batch)
            jax.block_until_ready(out)

        text = fn.lower(state, batch).compile().as_text()
        bench_utils.print_profile(f"train step, remat={remat}", bench_utils.profile_scopes(run, [text], profile_dir))
    return statistics.median(times), compile_s, float(m["ce"])


def bench_hf(model, tokens, steps):
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x = torch.as_tensor(tokens, dtype=torch.long)
    inputs, labels = x[:, :-1], x[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up (allocations)
    times, loss = [], None
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), loss


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.profile:
        bench_utils.enable_op_tracing()  # before jax starts its backend
    import jax
    import numpy as np

    import checkpoints
    import dsjax

    cfg = dsjax.Config.preset(FLAGS.config, vocab_size=FLAGS.vocab_size, index_topk=FLAGS.index_topk,
                              num_nextn_predict_layers=0, dtype="float32", param_dtype="float32")
    b, l = FLAGS.batch, FLAGS.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    model = None
    if FLAGS.skip_hf:
        params = dsjax.init_params(cfg, jax.random.key(0))
    else:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()),
                                                 attn_implementation="eager").float()
        with tempfile.TemporaryDirectory() as d:  # the same weights on both sides
            model.save_pretrained(d)
            loaded, params = checkpoints.load_hf(d)
        cfg = loaded.replace(dtype="float32", param_dtype="float32")
    peaks = peak_flops()
    peak = max(peaks.values())
    flops = model_flops_per_step(cfg, b, l)
    rows = []
    for remat in (None, "full"):
        t, compile_s, loss = bench_dsjax(cfg, params, tokens, remat, FLAGS.steps,
                                         FLAGS.profile if remat == "full" else None)
        rows.append((f"dsjax (jit, remat={remat})", t, loss, f"compile {compile_s:.0f} s"))
    if model is not None:
        t, loss = bench_hf(model, tokens, FLAGS.steps)
        rows.append(("HF transformers + torch AdamW (eager)", t, loss, ""))
    n_tok = b * l
    print(f"\n## Train step: preset={FLAGS.config} (vocab {cfg.vocab_size}, no MTP), "
          f"{dsjax.count_params(params) / 1e6:.1f}M params, batch={b} x seq_len={l}, index_topk={cfg.index_topk} "
          f"(DSA prunes: {l > cfg.index_topk}); model FLOPs/step {flops / 1e9:.1f} G")
    print(f"peak matmul (2048^3 fp32, this run): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print("| implementation | step (s) | tokens/s | model GFLOP/s | MFU | loss (last step) | note |\n"
          "|---|---|---|---|---|---|---|")
    for name, t, loss, note in rows:
        print(f"| {name} | {t:.3f} | {n_tok / t:,.0f} | {flops / t / 1e9:.1f} | {flops / t / peak:.1%} | "
              f"{loss:.3f} | {note} |")
    if model is not None:
        print(f"| **ratio dsjax (remat=None) / HF, tokens/s** | | **{rows[2][1] / rows[0][1]:.2f}x** | | | | |")


if __name__ == "__main__":
    app.run(main)
