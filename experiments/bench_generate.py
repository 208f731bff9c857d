"""Generation benchmark: dsjax against HF transformers' `generate`, MTP speculation, and the decode step's
cost against context length for DSA versus dense MLA.

    python experiments/bench_generate.py [--config=small] [--batch=4] [--prompt_len=512] [--new_tokens=32]
        [--contexts=2048,4096,8192,16384,32768] [--plot=experiments/bench_generate_decode.png]

Table 1: prefill tokens/s and decode tokens/s of greedy generation, dsjax (jit, XLA:CPU) vs HF transformers
  (PyTorch eager, its own KV cache) on the same weights, config, prompts and batch, and the ratio; plus the
  end-to-end time of `dsjax.generate` and of HF `model.generate`. HF's phases are timed directly (the
  prompt forward that fills its cache, then its cached one-token forwards), not as differences.
Table 2: MTP speculative decoding (2 tokens per step through the model): acceptance rate and decode
  tokens/s against plain decoding of the same model, with random MTP weights, optionally with an MTP
  distilled on the model's own greedy outputs (--mtp_train_steps; measured on other prompts), and on
  models whose MTP agrees by construction (`agreeing_mtp`, --mtp_eps).
Table 3 (+ PNG): one decode step (B = 1, all layers, lm_head and sampling) with the cache filled up to
  the context length, for DSA (indexer top-2048 + sparse MLA) and dense MLA (the same weights as
  model_type "deepseek_v3"). The attention dims are the real model's (128 heads, latent 512 + 64,
  indexer 64 x 128, top-2048) with a narrow hidden size so the weights fit a CPU; the cache holds random
  latents (prefilling 32K tokens on a CPU would take hours and does not change a decode step's cost).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.bench_utils import best_time  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
    """Flags are defined only when run as a script, so tests can import `agreeing_mtp` from this file."""
    flags.DEFINE_string("config", "small", "dsjax preset of tables 1 and 2.")
    flags.DEFINE_integer("batch", 4, "Batch size of tables 1 and 2.")
    flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per sequence (above the preset's index_topk: DSA prunes).")
    flags.DEFINE_integer("new_tokens", 32, "New tokens per sequence.")
    flags.DEFINE_list("mtp_eps", ["0.0", "0.05"], "Residual-branch scales of the agreeing-MTP rows of table 2.")
    flags.DEFINE_integer("mtp_train_steps", 0, "Adam steps distilling the MTP module on the model's own "
                         "greedy outputs (0: skip that row).")
    flags.DEFINE_list("contexts", ["2048", "4096", "8192", "16384", "32768"], "Context lengths of table 3.")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")
    flags.DEFINE_string("plot", "experiments/bench_generate_decode.png", "PNG of table 3 ('' to skip).")
    flags.DEFINE_bool("skip_hf", False, "Skip the HF comparison.")
    flags.DEFINE_list("tables", ["1", "2", "3"], "Which tables to run.")


def _scale_outputs(block, eps):
    """Scale a block's residual-branch outputs (attention wo, MLP / expert down projections) by eps."""
    b = {**block, "attn": {**block["attn"], "wo": block["attn"]["wo"] * eps}}
    if "mlp" in b:
        b["mlp"] = {**b["mlp"], "down": b["mlp"]["down"] * eps}
    if "moe" in b:
        m = b["moe"]
        b["moe"] = {**m, "experts": {**m["experts"], "down": m["experts"]["down"] * eps},
                    "shared": {**m["shared"], "down": m["shared"]["down"] * eps}}
    return b


def agreeing_mtp(params, config, eps):
    """A model whose MTP module largely agrees with it, by construction (no trained MTP weights exist for
    random models): shrink every block's residual branches by eps, so the model is close to the bigram
    model lm_head(norm(Emb(t))); make the MTP read only the embedding of t_{i+1} (eh_proj = [I; 0]) and
    share the final norm, so it predicts that same bigram for token i+2. At eps = 0 every draft is right;
    at eps > 0 attention and MoE still move the logits and some drafts are rejected. Needs params["mtp"]."""
    import jax.numpy as jnp

    d = config.hidden_size
    eh = params["mtp"]["eh_proj"]
    m = {**params["mtp"], "eh_proj": jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0).astype(eh.dtype),
         "enorm": jnp.ones_like(params["mtp"]["enorm"]), "norm": params["final_norm"],
         "block": _scale_outputs(params["mtp"]["block"], eps)}
    return {**params, "dense": _scale_outputs(params["dense"], eps), "moe": _scale_outputs(params["moe"], eps),
            "mtp": m}


def _hf_and_dsjax(cfg):
    """A random HF model of `cfg` and the same weights loaded into dsjax."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import checkpoints

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()), attn_implementation="eager")
    model = model.float().eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded, params = checkpoints.load_hf(d)
    return model, loaded.replace(num_nextn_predict_layers=cfg.num_nextn_predict_layers), params


def _dsjax_run(params, cfg, prompts, n_new, **kw):
    """Generate twice with the same shapes (the first compiles); stats of the second."""
    from dsjax.generate import generate_with_stats

    generate_with_stats(params, cfg, prompts, max_new_tokens=n_new, **kw)
    return generate_with_stats(params, cfg, prompts, max_new_tokens=n_new, **kw)


def _hf_phases(model, ids, n_new):
    """HF greedy decoding timed per phase: the prompt forward that fills its cache, then n_new - 1 cached
    one-token forwards (the loop `generate` runs). Returns (prefill s, decode s, new ids [B, n_new])."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(n_new - 1):
            out = model(nxt, cache=out.cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, 1).numpy()


def table_generate(cfg_name, batch, prompt_len, n_new, repeats, skip_hf):
    import numpy as np

    import dsjax
    from dsjax.generate import generate_with_stats

    cfg = dsjax.Config.preset(cfg_name)
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (batch, prompt_len))
    if skip_hf:
        import jax

        model, params = None, dsjax.init_params(cfg, jax.random.key(0))
    else:
        model, cfg, params = _hf_and_dsjax(cfg)
    run = lambda: generate_with_stats(params, cfg, list(prompts), max_new_tokens=n_new)
    run()  # compile
    runs = [run() for _ in range(repeats)]
    e2e = lambda r: r.stats["prefill_s"] + r.stats["decode_s"]
    rows = [("dsjax generate (jit, XLA:CPU)", min(r.stats["prefill_s"] for r in runs),
             min(r.stats["decode_s"] for r in runs), min(map(e2e, runs)))]
    if model is not None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ids = torch.as_tensor(prompts)
        phases = [_hf_phases(model, ids, n_new) for _ in range(repeats + 1)][1:]
        gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                     min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            t_gen = best_time(gen, repeats)
            same = np.array_equal(gen()[:, prompt_len:].numpy(), np.array(runs[0].tokens))
        rows.append(("HF transformers (torch eager, its KV cache)", min(p[0] for p in phases),
                     min(p[1] for p in phases), t_gen))
        same &= all(np.array_equal(p[2], np.array(runs[0].tokens)) for p in phases)
    n_pre, n_dec = batch * prompt_len, batch * (n_new - 1)
    print(f"\n## Greedy generation: preset={cfg_name}, {dsjax.count_params(params) / 1e6:.0f}M params, batch={batch}, "
          f"prompt={prompt_len} (index_topk={cfg.index_topk}), new tokens={n_new}, best of {repeats}")
    print("| implementation | prefill (s) | prefill tokens/s | decode (s) | decode tokens/s | generate end to end (s) |"
          "\n|---|---|---|---|---|---|")
    for name, tp, td, te in rows:
        print(f"| {name} | {tp:.3f} | {n_pre / tp:,.0f} | {td:.3f} | {n_dec / td:,.1f} | {te:.2f} |")
    if len(rows) == 2:
        (_, p0, d0, e0), (_, p1, d1, e1) = rows
        print(f"| **ratio dsjax / HF** | | **{p1 / p0:.2f}x** | | **{d1 / d0:.2f}x** | **{e1 / e0:.2f}x** |")
        print(f"\nSame greedy tokens as HF (generate and the timed loop): {same}. HF prefill = the prompt forward "
              "that fills its cache; HF decode = its cached one-token forwards; end to end = model.generate.")
    return cfg, params


def distill_mtp(params, cfg, steps, seed=0):
    """Train the MTP module (only it) to predict token i+2 on the model's own greedy continuations."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import dsjax
    from dsjax import model as model_lib
    from dsjax.generate import generate_with_stats

    rng = np.random.default_rng(seed)
    mtp = dsjax.init_params(cfg, jax.random.key(seed))["mtp"]
    prompts = rng.integers(2, cfg.vocab_size, (32, 16))
    cont = generate_with_stats(params, cfg, list(prompts), max_new_tokens=112).tokens
    seqs = jnp.asarray(np.concatenate([prompts, np.array(cont)], 1))
    hidden = jax.jit(lambda p, t: model_lib.forward_with_aux(p, t, cfg)[1].hidden)(params, seqs)
    opt = optax.adam(1e-3)

    def loss_fn(m, h, t):
        logits = dsjax.mtp_logits({**params, "mtp": m}, h, t, cfg)[:, :-2]
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 2:]).mean()

    @jax.jit
    def step(m, s, h, t):
        loss, g = jax.value_and_grad(loss_fn)(m, h, t)
        up, s = opt.update(g, s, m)
        return optax.apply_updates(m, up), s, loss

    state = opt.init(mtp)
    for i in range(steps):
        j = rng.integers(0, seqs.shape[0], 8)
        mtp, state, loss = step(mtp, state, hidden[j], seqs[j])
    return {**params, "mtp": mtp}, float(loss)


def table_mtp(params, cfg, batch, prompt_len, n_new, eps_list, train_steps):
    import jax
    import numpy as np

    import dsjax

    prompts = list(np.random.default_rng(1).integers(2, cfg.vocab_size, (batch, prompt_len)))
    if "mtp" not in params:
        params = {**params, "mtp": dsjax.init_params(cfg, jax.random.key(1))["mtp"]}
    rows = [("random weights: plain decoding", params, False),
            ("random weights: MTP (random MTP weights)", params, True)]
    if train_steps:
        trained, loss = distill_mtp(params, cfg, train_steps)
        rows.append((f"random weights: MTP distilled {train_steps} steps on the model's outputs (CE {loss:.2f})",
                     trained, True))
    for eps in eps_list:
        agree = agreeing_mtp(params, cfg, eps)
        rows += [(f"agreeing MTP, eps={eps}: plain decoding", agree, False),
                 (f"agreeing MTP, eps={eps}: MTP", agree, True)]
    print(f"\n## MTP speculative decoding: batch={batch}, prompt={prompt_len}, new tokens={n_new} (greedy)")
    print("| model: decoding | acceptance | decode steps | decode tokens/s | vs plain | same tokens as plain |\n"
          "|---|---|---|---|---|---|")
    base = None
    for name, p, mtp in rows:
        r = _dsjax_run(p, cfg, prompts, n_new, mtp=mtp)
        s = r.stats
        tps = s["decode_tokens"] / s["decode_s"]
        if not mtp:
            base, base_tokens = tps, r.tokens
        acc = f"{s['acceptance_rate']:.1%}" if s["drafted"] else "-"
        print(f"| {name} | {acc} | {s['steps']} | {tps:,.1f} | {tps / base:.2f}x | {r.tokens == base_tokens} |")


def scaling_config():
    """The real attention dims (heads, latent, rope, indexer, top-k) on a narrow, 2-layer model."""
    import dsjax

    return dsjax.Config.preset(
        "small", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128,
        index_topk=2048, vocab_size=1024, max_position_embeddings=65536, num_nextn_predict_layers=0)


def table_context(contexts, repeats, plot):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsjax
    from dsjax import cache as cache_lib
    from dsjax import model as model_lib

    dsa = scaling_config()
    dense = dsa.replace(model_type="deepseek_v3")
    params = dsjax.init_params(dsa, jax.random.key(0))
    dense_params = jax.tree.map(lambda x: x, params)
    for stack in ("dense", "moe"):
        dense_params[stack] = {**params[stack], "attn": {k: v for k, v in params[stack]["attn"].items()
                                                         if k != "indexer"}}

    @functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
    def step(p, cache, tok, pos, cfg):  # what generate's decode step runs for T = 1
        aux = model_lib.forward_hidden(p, tok, cfg, positions=pos, cache=cache_lib.layer_caches(cache))
        return {**cache, **aux.cache}, jnp.argmax(model_lib.lm_head(p, aux.hidden[:, 0]), -1)

    rows = []
    for s in contexts:
        times = []
        for cfg, p in ((dsa, params), (dense, dense_params)):
            rng = np.random.default_rng(s)
            cache = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1, x.shape), x.dtype),
                                 cache_lib.init_cache(cfg, 1, s))
            tok, pos = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), s - 1, jnp.int32)
            state = {"cache": cache}  # donated every step: keep the newest one

            def run():
                state["cache"], out = step(p, state["cache"], tok, pos, cfg=cfg)
                out.block_until_ready()

            times.append(best_time(run, repeats))
        rows.append((s, *times))
    print(f"\n## Decode step vs context (B=1, {dsa.num_hidden_layers} layers, H={dsa.num_attention_heads}, latent "
          f"{dsa.kv_lora_rank}+{dsa.qk_rope_head_dim}, indexer {dsa.index_n_heads}x{dsa.index_head_dim}, "
          f"top-{dsa.index_topk}, {dsjax.count_params(params) / 1e6:.0f}M params)")
    print("| context | DSA step (ms) | dense MLA step (ms) | dense / DSA |\n|---|---|---|---|")
    for s, a, d in rows:
        print(f"| {s} | {a * 1e3:.1f} | {d * 1e3:.1f} | {d / a:.2f}x |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r[0] for r in rows]
        ax.plot(xs, [r[1] * 1e3 for r in rows], "o-", label=f"DSA (indexer + sparse MLA, top-{dsa.index_topk})")
        ax.plot(xs, [r[2] * 1e3 for r in rows], "s-", label="dense MLA (absorbed)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens in the cache)")
        ax.set_ylabel("decode step (ms), B=1")
        ax.set_title(f"dsjax decode step on {jax.devices()[0].platform.upper()}, {dsa.num_hidden_layers} layers")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"\nplot: {plot}")


def main(argv):
    del argv
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    cfg = params = None
    if "1" in FLAGS.tables:
        cfg, params = table_generate(FLAGS.config, FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats,
                                     FLAGS.skip_hf)
    if "2" in FLAGS.tables:
        if params is None:
            import dsjax

            cfg = dsjax.Config.preset(FLAGS.config)
            params = dsjax.init_params(cfg, jax.random.key(0))
        table_mtp(params, cfg, FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens, [float(e) for e in FLAGS.mtp_eps],
                  FLAGS.mtp_train_steps)
    if "3" in FLAGS.tables:
        table_context([int(x) for x in FLAGS.contexts], FLAGS.repeats, FLAGS.plot)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
