"""The dsjax quickstart: train a small DeepSeek V3.2 (DSA) model from scratch on the King James Bible, on CPU.

    python experiments/quickstart.py          # no arguments; 7 minutes on an idle 2-core CPU (at most 9)

What it does, with the same library code as experiments/finetune.py:
  1. builds a 1.8M-parameter V3.2 model (MLA, lightning indexer with top-64 DSA, 8 routed experts + 1 shared,
     an MTP head) and trains it on experiments/data/kjv_genesis_ruth.txt (Genesis - Ruth, public domain)
     with rows of 256 tokens, so every query past position 64 attends to only the 64 keys its indexer picks;
  2. saves Orbax checkpoints (async) and logs TensorBoard scalars as it goes, with a progress bar;
  3. reloads the final checkpoint, samples a continuation of a prompt (`dsjax.generate`), and writes the
     loss-curve PNG;
  4. prints where everything is, and the exact commands that generate from and export the trained model.

Optional flags: --workdir, --steps, --minutes (wall-clock budget of the whole script), --prompt.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "experiments", "data")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "output directory (default runs/quickstart-<time>)")
flags.DEFINE_integer("steps", 700, "optimizer steps (fewer if the --minutes budget runs out first)")
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    t0 = time.time()
    if FLAGS.steps < 1:
        raise app.UsageError(f"--steps={FLAGS.steps}: train for at least 1 step.")
    import jax

    import checkpoints
    from dsjax.train import DataConfig, OptimConfig, RunConfig, TrainConfig, run
    from dsjax.train import data, trainer

    workdir = FLAGS.workdir or os.path.join("runs", time.strftime("quickstart-%Y%m%d-%H%M%S"))
    config = model_config()
    tok_path = os.path.join(DATA, "kjv_bpe.json")
    tokenizer = data.load_tokenizer(tok_path)
    rc = RunConfig(
        model=config, tokenizer=tok_path, steps=FLAGS.steps, workdir=workdir, save_every=100, keep=2,
        time_limit_s=FLAGS.minutes * 60 - (time.time() - t0) - 45,  # keep ~45 s to save and sample
        data=DataConfig(paths=(os.path.join(DATA, "kjv_genesis_ruth.txt"),), seq_len=SEQ_LEN, batch_size=BATCH,
                        packing="concat", seed=0),
        train=TrainConfig(stage="sft", remat=None, mtp_weight=0.1,
                          optim=OptimConfig(learning_rate=3e-3, warmup_steps=min(30, FLAGS.steps - 1),
                                            total_steps=FLAGS.steps,
                                            min_lr_ratio=0.1, weight_decay=0.01)))
    n_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: __import__("dsjax").init_params(
        config, jax.random.key(0)))))
    print(f"dsjax quickstart: DeepSeek V3.2 layout, {n_params / 1e6:.1f}M params, rows of {SEQ_LEN} tokens, "
          f"DSA top-{TOPK} (queries past position {TOPK} attend to {TOPK} indexer-chosen keys)")
    print(f"training on {rc.data.paths[0]} (King James Version, Genesis-Ruth); first step compiles (~20-60 s)")
    res = run(rc)
    first, last = res.rows[0]["ce"], sum(r["ce"] for r in res.rows[-10:]) / min(10, len(res.rows))
    print(f"\nnext-token loss {first:.2f} -> {last:.2f} nats/token over {res.step} steps "
          f"({res.step * BATCH * SEQ_LEN / 1e6:.2f}M tokens)" + (" (time budget reached)" if res.stopped_early else ""))

    # Reload the saved checkpoint (what a later session would do) and sample from it.
    ckpts = res.paths["checkpoints"]
    step = checkpoints.describe(ckpts).step
    _, params = checkpoints.load(ckpts)
    text = sample(params, config, tokenizer, FLAGS.prompt, FLAGS.new_tokens)
    print(f"\nsample from the step-{step} checkpoint (temperature 0.7, top-k 40):\n\n{text}\n")
    print(trainer.summary(res))
    print(f"  {'view with':12s} tensorboard --logdir {res.paths['tensorboard']}")
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    print("use the model:")
    print(f"  python experiments/generate.py --ckpt_dir={ckpts} --prompt={FLAGS.prompt!r} --max_new_tokens=64")
    print(f"  python -m checkpoints.export --ckpt_dir={ckpts} --out_dir={os.path.join(res.paths['workdir'], 'hf')}")


if __name__ == "__main__":
    app.run(main)
