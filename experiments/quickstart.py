"""The dsjax quickstart: train a small DeepSeek V3.2 (DSA) model from scratch on the King James Bible, on CPU,
with DeepSeek's own recipe for sparse attention.

    python experiments/quickstart.py          # no arguments; about 8 minutes on an idle 2-core CPU (at most 9)

What it does, with the same library code as experiments/finetune.py:
  1. builds a 1.8M-parameter V3.2 model (MLA, lightning indexer, 8 routed experts + 1 shared, an MTP head)
     and trains it on experiments/data/kjv_genesis_ruth.txt (Genesis - Ruth, public domain) in rows of 256
     tokens, in the three stages of the V3.2 report (spec §10):
       dense    language modelling with dense attention (every key), like the V3.1 model DSA starts from;
       warm-up  only the lightning indexer trains, on the KL to the dense attention (stage indexer_warmup);
       sparse   DSA on: every query past position 64 attends to the 64 keys its indexer picks, and
                everything trains (the indexer on the KL over its selection);
     with Orbax checkpoints (async), TensorBoard scalars and a progress bar;
  2. reports the indexer against the attention it stands in for, before and after its training:
     KL(attention || indexer) and top-64 recall of the attention's top-64 keys;
  3. reloads the final checkpoint, samples a continuation of a prompt (`dsjax.generate`), writes the
     loss-curve PNG, and prints the exact commands that generate from and export the trained model.

Optional flags: --workdir, --steps (all stages), --minutes (wall-clock budget of the whole script), --prompt.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsjax import cli  # noqa: E402

DATA = os.path.join(ROOT, "experiments", "data")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "output directory (default runs/quickstart-<time>)")
flags.DEFINE_integer("steps", 700, "optimizer steps of all three stages together (fewer if the --minutes "
                     "budget runs out first)")
flags.DEFINE_float("minutes", 9.0, "wall-clock budget of the whole script: training stops early (and saves) "
                   "so that everything ends within it")
flags.DEFINE_string("prompt", "And the LORD said unto Moses,", "prompt for the sample")
flags.DEFINE_integer("new_tokens", 80, "tokens to sample")

SEQ_LEN, BATCH, TOPK = 256, 8, 64


def model_config():
    import dsjax

    # The "tiny" V3.2 layout (2 dense + 2 MoE layers, group-limited routing, MTP) with the corpus tokenizer's
    # vocabulary; index_topk < SEQ_LEN makes DSA prune. fp32 on CPU (XLA:CPU bf16 matmuls are slower).
    return dsjax.Config.preset("tiny", vocab_size=2048, index_topk=TOPK, max_position_embeddings=1024,
                               dtype="float32", param_dtype="float32")


def sample(params, config, tokenizer, prompt: str, n_new: int, *, temperature: float = 0.7, top_k: int = 40,
           seed: int = 0) -> str:
    """Sample a continuation of `prompt` with `dsjax.generate` (decoding over the latent KV cache)."""
    import dsjax
    from dsjax.train import data

    ids = [tokenizer.token_to_id(data.BOS)] + tokenizer.encode(prompt).ids
    out = dsjax.generate(params, config, [ids], max_new_tokens=n_new, temperature=temperature, top_k=top_k,
                         seed=seed, stop_tokens=(tokenizer.token_to_id(data.EOS),))[0]
    return prompt + tokenizer.decode(list(out))


def stage_steps(total: int) -> dict[str, int]:
    """Steps per stage: warm-up 1/10, sparse 1/5 of the total, the rest dense (each at least 1)."""
    warm, sparse = max(1, total // 10), max(1, total // 5)
    return {"dense": max(1, total - warm - sparse), "indexer_warmup": warm, "sparse": sparse}


def eval_batch(tokenizer, config):
    """A fixed batch of the corpus (its own shuffle seed), the same for every indexer measurement."""
    from dsjax.train import DataConfig, data

    dc = DataConfig(paths=(os.path.join(DATA, "kjv_genesis_ruth.txt"),), seq_len=SEQ_LEN, batch_size=4,
                    packing="concat", seed=1234)
    return data.next_batch(data.make_iterator(dc, tokenizer, vocab_size=config.vocab_size), dc)


def main(argv):
    del argv
    t0 = time.time()
    if FLAGS.steps < 3:
        raise app.UsageError(f"--steps={FLAGS.steps}: the recipe has three stages; train for at least 3 steps.")
    import dataclasses

    import jax

    import checkpoints
    from dsjax.train import DataConfig, OptimConfig, RunConfig, TrainConfig, run
    from dsjax.train import data, evaluate, trainer

    workdir = FLAGS.workdir or os.path.join("runs", time.strftime("quickstart-%Y%m%d-%H%M%S"))
    config = model_config()
    tok_path = os.path.join(DATA, "kjv_bpe.json")
    tokenizer = data.load_tokenizer(tok_path)
    steps = stage_steps(FLAGS.steps)
    n_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: __import__("dsjax").init_params(
        config, jax.random.key(0)))))
    print(f"dsjax quickstart: DeepSeek V3.2 layout, {n_params / 1e6:.1f}M params, rows of {SEQ_LEN} tokens, "
          f"DSA top-{TOPK}; stages: dense {steps['dense']} steps, indexer warm-up {steps['indexer_warmup']}, "
          f"sparse {steps['sparse']}")
    print(f"training on {os.path.join(DATA, 'kjv_genesis_ruth.txt')} (King James Version, Genesis-Ruth); each "
          "stage's first step compiles (~20-60 s)")

    def optim(n, lr):
        return OptimConfig(learning_rate=lr, warmup_steps=min(30, n - 1), total_steps=n, min_lr_ratio=0.1,
                           weight_decay=0.01)

    base = RunConfig(
        model=config.replace(index_topk=SEQ_LEN), tokenizer=tok_path, steps=steps["dense"], save_every=100, keep=2,
        workdir=os.path.join(workdir, "1_dense"),
        data=DataConfig(paths=(os.path.join(DATA, "kjv_genesis_ruth.txt"),), seq_len=SEQ_LEN, batch_size=BATCH,
                        packing="concat", seed=0),
        train=TrainConfig(stage="sft", remat=None, mtp_weight=0.1, optim=optim(steps["dense"], 3e-3)))
    budget = FLAGS.minutes * 60 - 60  # keep a minute to measure, save and sample

    def remaining(share):
        return max(30.0, (budget - (time.time() - t0)) * share)

    results = {}
    print("\n[1/3] dense attention (index_topk = row length: every key)")
    results["dense"] = run(dataclasses.replace(base, time_limit_s=remaining(0.7)))
    ev = eval_batch(tokenizer, config)
    before = evaluate.indexer_quality(results["dense"].state["params"], config, ev)

    print("\n[2/3] indexer warm-up: only the indexer trains, on the KL to the dense attention")
    results["indexer_warmup"] = run(dataclasses.replace(
        base, model=None, init_ckpt=results["dense"].paths["checkpoints"], model_options={"index_topk": TOPK},
        workdir=os.path.join(workdir, "2_indexer_warmup"), steps=steps["indexer_warmup"],
        train=TrainConfig(stage="indexer_warmup", remat=None, optim=optim(steps["indexer_warmup"], 3e-3)),
        time_limit_s=remaining(0.35)))
    warmed = evaluate.indexer_quality(results["indexer_warmup"].state["params"], config, ev)

    print(f"\n[3/3] sparse: DSA top-{TOPK}, everything trains (the indexer on the KL over its selection)")
    results["sparse"] = run(dataclasses.replace(
        base, model=None, init_ckpt=results["indexer_warmup"].paths["checkpoints"],
        model_options={"index_topk": TOPK}, workdir=os.path.join(workdir, "3_sparse"), steps=steps["sparse"],
        train=TrainConfig(stage="sparse", remat=None, mtp_weight=0.1, optim=optim(steps["sparse"], 1e-3)),
        time_limit_s=remaining(1.0)))
    res = results["sparse"]
    after = evaluate.indexer_quality(res.state["params"], config, ev)

    for name, r in results.items():
        first, last = r.rows[0]["ce"], sum(x["ce"] for x in r.rows[-10:]) / min(10, len(r.rows))
        print(f"{name:15s} next-token loss {first:.2f} -> {last:.2f} nats/token over {r.step} steps"
              + (" (time budget reached)" if r.stopped_early else ""))
    print(f"\nindexer vs. the dense attention (a fixed batch; chance recall {before['chance']:.2f}):")
    for name, q in (("at init", before), ("after warm-up", warmed), ("after sparse", after)):
        print(f"  {name:14s} KL {q['kl']:.3f}   top-{TOPK} recall {q['recall']:.3f}")

    # Reload the saved checkpoint (what a later session would do) and sample from it.
    ckpts = res.paths["checkpoints"]
    step = checkpoints.describe(ckpts).step
    cfg, params = checkpoints.load(ckpts)
    text = sample(params, cfg, tokenizer, FLAGS.prompt, FLAGS.new_tokens)
    print(f"\nsample from the step-{step} checkpoint (temperature 0.7, top-k 40):\n\n{text}\n")
    print(trainer.summary(res))
    print(f"  {'view with':12s} tensorboard --logdir {os.path.abspath(workdir)}")
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    print("use the model:")
    print(f"  python experiments/generate.py --ckpt_dir={ckpts} --prompt={FLAGS.prompt!r} --max_new_tokens=64")
    print(f"  python -m checkpoints.export --ckpt_dir={ckpts} --out_dir={os.path.join(res.paths['workdir'], 'hf')}")


if __name__ == "__main__":
    cli.run(main, "quickstart.py")
