"""Generate text with dsjax from the command line, streaming tokens to the terminal.

    python experiments/generate.py --hf_dir=path/to/hf --chat="What is 1+1?" --thinking
    python experiments/generate.py --ckpt_dir=path/to/orbax --tokenizer=path/to/tokenizer.json --prompt="Once" \
        --mesh=expert=8,tensor=4
    python experiments/generate.py --config=tiny --prompt_ids=0,5,7 --max_new_tokens=16    # random weights
    python experiments/generate.py --flagfile=experiments/configs/generate_tiny.flags    # the same, from a file

Weights: --ckpt_dir (any dsjax model on disk, `checkpoints.load`: a converted checkpoint, restored into its
shards with --mesh, or a training run's workdir / checkpoints/ / checkpoints/<step>), --hf_dir (HF safetensors, in memory: small models), or --config (a preset with random weights, for
smoke tests). Prompt: --prompt (raw text, BOS prepended), --chat (one user message in the DeepSeek V3.2 chat
format, with --system and --thinking), --chat_file (a JSON list of messages), or --prompt_ids. Several
--prompt / --chat flags make a batch; the first sequence is streamed, the rest printed at the end.
The last line reports prefill and decode tokens/s (and the MTP acceptance rate with --mtp).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax import cli  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt_dir", None, "A dsjax model: converted checkpoint or training run (workdir, checkpoints/ "
                    "or checkpoints/<step>); see checkpoints.load.")
flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors).")
flags.DEFINE_string("config", None, "dsjax preset with random weights (smoke tests), e.g. 'tiny'.")
flags.DEFINE_string("tokenizer", None, "tokenizer.json or its directory (default: inside --hf_dir/--ckpt_dir).")
flags.DEFINE_multi_string("prompt", [], "Raw text prompt (BOS is prepended); repeat for a batch.")
flags.DEFINE_multi_string("chat", [], "A user message, encoded in the V3.2 chat format; repeat for a batch.")
flags.DEFINE_string("chat_file", None, "JSON file with a list of chat messages (role/content dicts).")
flags.DEFINE_string("system", None, "System prompt for --chat.")
flags.DEFINE_bool("thinking", False, "Thinking mode for chat prompts (the answer starts with reasoning).")
flags.DEFINE_list("prompt_ids", [], "Token ids of one prompt (no tokenizer needed).")
flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus truncation (1 = off).")
flags.DEFINE_integer("top_k", 0, "Top-k truncation (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("mtp", False, "Speculative decoding with the MTP module.")
flags.DEFINE_string("mesh", None, "Device mesh as axis=size pairs, e.g. expert=8,tensor=4 (axes: data, fsdp, "
                    "sequence, expert, tensor); default: one device.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Param/compute dtype (default: as stored for --ckpt_dir, "
                  "bfloat16 for --hf_dir / --config).")
flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens per prefill call.")
flags.DEFINE_bool("print_ids", False, "Also print the generated token ids (one line per prompt).")
flags.DEFINE_bool("warmup", False, "Compile with an untimed 2-token run first, so tokens/s exclude compilation.")


def parse_mesh(text, config):
    """The layout (`sharding.parallelism_from_spec`) of --mesh; None for no mesh."""
    import sharding

    try:
        return sharding.parallelism_from_spec(text, config=config)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}") from None


def load_model(ckpt_dir=None, hf_dir=None, config=None, dtype=None, parallel=None):
    """(Config, params) from exactly one of ckpt_dir / hf_dir / config (restored onto the `parallel` layout for
    ckpt_dir)."""
    import jax

    import checkpoints
    import dsjax

    given = [n for n, v in (("--ckpt_dir", ckpt_dir), ("--hf_dir", hf_dir), ("--config", config)) if v]
    if len(given) != 1:
        raise app.UsageError(f"pass exactly one of --ckpt_dir, --hf_dir, --config (got {given or 'none'}).")
    if ckpt_dir:
        return checkpoints.load(ckpt_dir, parallel=parallel, dtype=dtype)
    dtype = dtype or "bfloat16"
    if hf_dir:
        return checkpoints.load_hf(hf_dir, dtype=dtype)
    cfg = dsjax.Config.preset(config, dtype=dtype, param_dtype=dtype)
    return cfg, dsjax.init_params(cfg, jax.random.key(0))


def build_prompts(tok, *, prompts=(), chats=(), chat_file=None, system=None, thinking=False, prompt_ids=()):
    """Token-id prompts from the prompt flags (see the module docstring)."""
    out = [[int(i) for i in prompt_ids]] if prompt_ids else []
    if (prompts or chats or chat_file) and tok is None:
        raise app.UsageError("text prompts need --tokenizer (or a tokenizer.json inside --hf_dir/--ckpt_dir).")
    out += [tok.encode(p, add_bos=True) for p in prompts]
    head = [{"role": "system", "content": system}] if system else []
    out += [tok.encode_chat(head + [{"role": "user", "content": c}], thinking=thinking) for c in chats]
    if chat_file:
        with open(chat_file, encoding="utf-8") as f:
            out.append(tok.encode_chat(json.load(f), thinking=thinking))
    if not out:
        raise app.UsageError("give a prompt: --prompt, --chat, --chat_file or --prompt_ids.")
    return out


def check_flags() -> None:
    """Sampling and source flags, before anything is read."""
    given = [n for n, v in (("--ckpt_dir", FLAGS.ckpt_dir), ("--hf_dir", FLAGS.hf_dir), ("--config", FLAGS.config))
             if v]
    if len(given) != 1:
        raise app.UsageError(f"pass exactly one of --ckpt_dir, --hf_dir, --config (got {given or 'none'}).")
    if FLAGS.max_new_tokens < 1:
        raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens}: must be >= 1.")
    if not FLAGS.temperature >= 0:
        raise app.UsageError(f"--temperature={FLAGS.temperature}: must be >= 0 (0 = greedy).")
    if not 0 < FLAGS.top_p <= 1:
        raise app.UsageError(f"--top_p={FLAGS.top_p}: must be in (0, 1] (1 = off).")
    if FLAGS.top_k < 0:
        raise app.UsageError(f"--top_k={FLAGS.top_k}: must be >= 0 (0 = off).")
    if FLAGS.prefill_chunk < 1:
        raise app.UsageError(f"--prefill_chunk={FLAGS.prefill_chunk}: must be >= 1.")
    bad = [i for i in FLAGS.prompt_ids if not i.strip().lstrip("-").isdigit()]
    if bad:
        raise app.UsageError(f"--prompt_ids: {bad[0]!r} is not a token id; give comma-separated integers.")
    if FLAGS.chat_file and not os.path.isfile(FLAGS.chat_file):
        raise app.UsageError(f"--chat_file={FLAGS.chat_file}: no such file.")


def model_config(dtype):
    """The model's Config from metadata alone (no weights read), to check the prompts against."""
    import checkpoints
    import dsjax

    if FLAGS.ckpt_dir:
        return checkpoints.model_dir.read_config(FLAGS.ckpt_dir)
    if FLAGS.hf_dir:
        return dsjax.Config.from_hf(FLAGS.hf_dir)
    try:
        return dsjax.Config.preset(FLAGS.config, dtype=dtype or "bfloat16", param_dtype=dtype or "bfloat16")
    except ValueError as e:
        raise app.UsageError(f"--config: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    import dsjax
    from dsjax.generate import cache_length, check_request

    check_flags()
    cfg = model_config(FLAGS.dtype)
    par = parse_mesh(FLAGS.mesh, cfg) if FLAGS.mesh else None  # also checks that the model can be split over it
    tok_path = FLAGS.tokenizer or next((d for d in (FLAGS.hf_dir, FLAGS.ckpt_dir)
                                        if d and os.path.isfile(os.path.join(d, "tokenizer.json"))), None)
    if tok_path is None and FLAGS.ckpt_dir:  # a converted checkpoint's assets, or the tokenizer a run trained with
        import checkpoints

        tok_path = checkpoints.describe(FLAGS.ckpt_dir).tokenizer
    tok = dsjax.Tokenizer.from_file(tok_path) if tok_path else None
    prompts = build_prompts(tok, prompts=FLAGS.prompt, chats=FLAGS.chat, chat_file=FLAGS.chat_file,
                            system=FLAGS.system, thinking=FLAGS.thinking, prompt_ids=FLAGS.prompt_ids)
    if FLAGS.mtp and not cfg.num_nextn_predict_layers:
        raise app.UsageError("--mtp: this model has no MTP module (num_nextn_predict_layers=0).")
    check_request(cfg, prompts, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                  top_p=FLAGS.top_p, top_k=FLAGS.top_k, prefill_chunk=FLAGS.prefill_chunk)
    # Everything checked: now read the weights (restored straight into the mesh's shards for --ckpt_dir).
    cfg, params = load_model(FLAGS.ckpt_dir, FLAGS.hf_dir, FLAGS.config, FLAGS.dtype, par)
    eos = tok.eos_id if tok is not None and tok.eos_id is not None else cfg.eos_token_id
    stops = [eos] if eos is not None and eos < cfg.vocab_size else []
    stream = tok.stream(skip_special_tokens=False) if tok is not None else None

    def show(new):
        piece = [t for t in new[0] if t not in stops]
        text = stream.push(piece) if stream is not None else "".join(f" {t}" for t in piece)
        print(text, end="", flush=True)

    kw = dict(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=FLAGS.seed,
              stop_tokens=stops, mtp=FLAGS.mtp, prefill_chunk=FLAGS.prefill_chunk, parallel=par)
    if FLAGS.warmup:  # same prompt and cache buckets as the real run, so every shape is compiled
        dsjax.generate_with_stats(params, cfg, prompts, max_new_tokens=2, **kw,
                                  max_len=cache_length(max(map(len, prompts)) + FLAGS.max_new_tokens, cfg))
    t0 = time.perf_counter()
    res = dsjax.generate_with_stats(params, cfg, prompts, max_new_tokens=FLAGS.max_new_tokens,
                                    callback=show, **kw)
    wall = time.perf_counter() - t0
    if stream is not None:
        print(stream.flush(), end="")
    print()
    for i, toks in enumerate(res.tokens[1:], 1):
        body = tok.decode([t for t in toks if t not in stops]) if tok is not None else " ".join(map(str, toks))
        print(f"--- prompt {i} ---\n{body}")
    if FLAGS.print_ids:
        for toks in res.tokens:
            print("ids:", ",".join(map(str, toks)))
    s = res.stats
    note = "" if FLAGS.warmup else " (incl. compilation; see --warmup)"
    line = (f"[dsjax] {len(prompts)} prompt(s), {s['prompt_tokens']} prompt tokens, {s['new_tokens']} new tokens "
            f"in {wall:.2f}s{note} | prefill {s['prompt_tokens'] / s['prefill_s']:.1f} tokens/s | "
            f"decode {s['decode_tokens'] / max(s['decode_s'], 1e-9):.1f} tokens/s")
    if FLAGS.mtp:
        line += f" | MTP acceptance {s['acceptance_rate']:.1%} ({s['accepted']}/{s['drafted']})"
    print(line)


if __name__ == "__main__":
    cli.run(main, "generate.py")
