"""GRPO fine-tuning of a DeepSeek V3.2 / V3 model with DeepSeek V3.2's stabilisers (spec §10.3, §10.5).

    python experiments/grpo.py --workdir=runs/grpo          # the shipped demonstration (5-9 min on 2 CPU cores)
    python experiments/grpo.py --flagfile=experiments/configs/v32_grpo_lora.flags   # your model and prompts

With its default flags (--task=addition) the script runs a whole demonstration in --workdir: it writes a
verifiable task (2-digit addition in the V3.2 chat format, 500 problems held out), makes a tiny V3.2 model
partly competent with a short SFT (experiments/finetune.py's trainer), measures its held-out accuracy
(greedy answers), trains it with GRPO on its own sampled answers (reward 1 for the exact sum), and measures
again. The last line reads `held-out accuracy: BEFORE -> AFTER`.

With --task=file the policy starts from --init_ckpt (a converted checkpoint, an HF directory or a dsjax
training run) and samples answers to --prompts (JSONL records {"prompt": ...} or {"messages": [...]}, plus
the fields rewards read, e.g. "answer"); --eval_prompts are held out and answered greedily.

Rewards: exact answer (--answer_pattern: a regex whose group 1 is the answer; default the whole completion),
--format_pattern / --format_weight, --max_chars / --length_per_char (a length penalty), and any Python
callable on the decoded text (--reward_fn=module:function, called as fn(prompt, completion, example)).
Stabilisers (each a flag): --keep_routing, --keep_selection, --keep_sampling_mask, --offpolicy_delta.

Outputs in --workdir (the GRPO run in grpo/): checkpoints/ (Orbax, async), tensorboard/, metrics.jsonl
(reward mean/std, accuracy, held-out accuracy, KL, clip fraction, ...), grpo_curve.png. --resume continues
a stopped run bit-identically; SIGTERM saves the current step and exits.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from dsjax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "addition", ["addition", "file"], "addition: the shipped demonstration (SFT start, "
                  "GRPO, evaluation); file: GRPO on --prompts from --init_ckpt")
flags.DEFINE_string("workdir", None, "output directory")
# task=file
flags.DEFINE_string("init_ckpt", None, "the policy's start (task=file): converted checkpoint, HF dir, training run")
flags.DEFINE_string("tokenizer", None, "tokenizer.json (task=file; default: the one next to --init_ckpt)")
flags.DEFINE_string("prompts", None, "JSONL prompt records for rollouts (task=file)")
flags.DEFINE_string("eval_prompts", None, "JSONL held-out prompt records, answered greedily (task=file)")
flags.DEFINE_bool("chat", True, "render prompts in the V3.2 chat format (else BOS + the prompt text)")
flags.DEFINE_string("dtype", None, "compute dtype (default: the checkpoint's / the task's)")
flags.DEFINE_string("param_dtype", None, "master-weight dtype")
# task=addition
flags.DEFINE_integer("digits", 2, "addition: digits per operand")
flags.DEFINE_integer("heldout", 500, "addition: held-out problems")
flags.DEFINE_integer("sft_steps", 1000, "addition: at most this many SFT steps (the lr schedule's length)")
flags.DEFINE_float("sft_target", 0.4, "addition: SFT stops once this share of training problems is answered")
flags.DEFINE_float("sft_lr", 3e-3, "addition: SFT peak learning rate")
# rollouts
flags.DEFINE_integer("steps", 300, "GRPO steps (rollout batches); a resumed run continues up to this")
flags.DEFINE_integer("schedule_steps", None, "length of the lr schedule (default --steps)")
flags.DEFINE_integer("prompts_per_step", 32, "prompts per rollout batch")
flags.DEFINE_integer("group_size", 8, "G: sampled completions per prompt")
flags.DEFINE_integer("max_new_tokens", None, "completion length limit (default 4 for addition, 512 otherwise)")
flags.DEFINE_integer("max_prompt_tokens", None, "rows hold this many prompt tokens + --max_new_tokens (a fixed "
                     "shape for the plan; a longer prompt is refused); default: the longest prompt")
flags.DEFINE_float("temperature", 1.0, "sampling temperature (π_θ is tempered the same way)")
flags.DEFINE_integer("top_k", 0, "sampler top-k (0 = off)")
flags.DEFINE_float("top_p", 1.0, "sampler top-p (1 = off)")
# objective and stabilisers
flags.DEFINE_float("clip_eps", 0.2, "ε of the clipped ratio")
flags.DEFINE_float("kl_beta", 0.0, "β of the unbiased-k3 KL to the reference (needs --lora_rank: the base)")
flags.DEFINE_bool("std_normalize", False, "divide advantages by the group std (V3.2 does not)")
flags.DEFINE_float("offpolicy_delta", None, "δ of off-policy sequence masking (default off)")
flags.DEFINE_bool("keep_routing", True, "replay the rollout's MoE routing in training")
flags.DEFINE_bool("keep_selection", True, "replay the rollout's DSA keys in training")
flags.DEFINE_bool("keep_sampling_mask", True, "train π_θ on the sampler's truncated vocabulary")
flags.DEFINE_integer("updates_per_rollout", 1, "optimizer steps on each rollout batch")
# rewards
flags.DEFINE_string("answer_pattern", None, "regex whose group 1 is the answer (default: the whole completion)")
flags.DEFINE_string("format_pattern", None, "regex the whole completion should match (format reward)")
flags.DEFINE_float("format_weight", 0.1, "weight of the format reward")
flags.DEFINE_integer("max_chars", None, "length penalty beyond this many characters (default off)")
flags.DEFINE_float("length_per_char", 0.01, "length penalty per character beyond --max_chars")
flags.DEFINE_string("reward_fn", None, "an extra reward, module:function, called fn(prompt, completion, example)")
# optimizer
flags.DEFINE_float("lr", 3e-5, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 0, "linear warm-up (optimizer steps)")
flags.DEFINE_float("min_lr_ratio", 1.0, "final lr / --lr (cosine; 1 = constant)")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
flags.DEFINE_float("clip_norm", 1.0, "global-norm gradient clipping (0 = off)")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per optimizer step")
flags.DEFINE_integer("lora_rank", 0, "LoRA rank (0 = full fine-tuning)")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: rank)")
flags.DEFINE_list("lora_targets", ["attn"], "LoRA targets: attn, shared, experts")
flags.DEFINE_string("remat", "off", "layer rematerialisation policy (full, dots, ..., off)")
# run
flags.DEFINE_integer("eval_every", 50, "held-out evaluation every N steps (and at the start and the end)")
flags.DEFINE_integer("save_every", 50, "checkpoint every N steps (async)")
flags.DEFINE_integer("keep", 3, "checkpoints to keep")
flags.DEFINE_bool("resume", False, "continue the run in --workdir")
flags.DEFINE_integer("seed", 0, "seed of the model init, SFT data order, LoRA init, prompt order and sampling")
flags.DEFINE_string("mesh", None, "device mesh, e.g. expert=64,fsdp=4 (default: one device)")
flags.DEFINE_bool("progress", True, "show progress bars")
flags.mark_flag_as_required("workdir")


class FlagError(ValueError):
    pass


def reward_functions():
    """(reward, accuracy) from the flags: accuracy is the exact-answer reward alone."""
    from dsjax.train import rewards

    accuracy = rewards.exact_answer(FLAGS.answer_pattern)
    parts = [(accuracy, 1.0)]
    if FLAGS.format_pattern:
        parts.append((rewards.format_check(FLAGS.format_pattern), FLAGS.format_weight))
    if FLAGS.max_chars is not None:
        parts.append((rewards.length_penalty(FLAGS.max_chars, per_char=FLAGS.length_per_char), 1.0))
    if FLAGS.reward_fn:
        mod, _, name = FLAGS.reward_fn.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise FlagError(f"--reward_fn={FLAGS.reward_fn!r}: {e}; give module:function on the Python path.") \
                from None
        parts.append((fn, 1.0))
    return rewards.combine(*parts), accuracy


def train_config(total: int):
    from dsjax import lora
    from dsjax.train import grpo, schedule, step

    lc = None
    if FLAGS.lora_rank:
        lc = lora.LoraConfig(rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha, targets=tuple(FLAGS.lora_targets))
    gc = grpo.GRPOConfig(group_size=FLAGS.group_size, clip_eps=FLAGS.clip_eps, kl_beta=FLAGS.kl_beta,
                         std_normalize=FLAGS.std_normalize, offpolicy_delta=FLAGS.offpolicy_delta,
                         keep_sampling_mask=FLAGS.keep_sampling_mask, temperature=FLAGS.temperature)
    n = total * FLAGS.updates_per_rollout
    return step.TrainConfig(
        stage="grpo", grpo=gc, lora=lc, grad_accum=FLAGS.grad_accum, bias_update_rate=0.0,
        remat=None if FLAGS.remat == "off" else FLAGS.remat,
        optim=schedule.OptimConfig(learning_rate=FLAGS.lr, warmup_steps=min(FLAGS.warmup_steps, n - 1),
                                   total_steps=n, min_lr_ratio=FLAGS.min_lr_ratio,
                                   weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm))


def sft_start(workdir: str, files: dict[str, str]) -> str:
    """The demonstration's start: SFT of a fresh tiny V3.2 on the task until it is partly competent (greedy
    accuracy on 200 *training* problems >= --sft_target, checked every 25 steps; at most --sft_steps), so
    every seed starts GRPO from a comparable model. Reused when WORKDIR/sft/done.json says it finished;
    continued from its checkpoint with --resume. Returns its checkpoints directory."""
    import json

    import addition_task
    import dsjax
    from dsjax.tokenizer import Tokenizer
    from dsjax.train import DataConfig, OptimConfig, RunConfig, TrainConfig, TrainCheckpointer, rewards, rl, run

    out = os.path.join(workdir, "sft")
    ckpts, marker = os.path.join(out, "checkpoints"), os.path.join(out, "done.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        print(f"SFT start: reusing {ckpts} (step {done['step']}, training-problem accuracy {done['accuracy']:.3f})")
        return ckpts
    started = None
    if os.path.isdir(ckpts):
        ck = TrainCheckpointer(ckpts)
        started = ck.latest_step()
        ck.close()
    if started is not None and not FLAGS.resume:
        raise FlagError(f"{ckpts} already holds an SFT run (step {started}); pass --resume or use a new --workdir.")
    n = FLAGS.sft_steps
    config = addition_task.model_config(FLAGS.digits)
    rc = RunConfig(
        model=config, tokenizer=files["tokenizer"], steps=n, workdir=out, save_every=25, keep=1,
        resume=started is not None, seed=FLAGS.seed, progress=FLAGS.progress,
        data=DataConfig(paths=(files["sft"],), seq_len=64, batch_size=16, packing="first_fit", seed=FLAGS.seed),
        train=TrainConfig(stage="sft", remat=None, mtp_weight=0.0, optim=OptimConfig(
            learning_rate=FLAGS.sft_lr, warmup_steps=min(20, n - 1), total_steps=n, min_lr_ratio=0.1,
            weight_decay=0.01)))
    tok = Tokenizer.from_file(files["tokenizer"])
    probe = rl.read_prompts(files["prompts"])[:200]
    probe_ids = [rl.encode_prompt(tok, r) for r in probe]
    seen = {"accuracy": 0.0}

    def measure(params) -> float:
        seen["accuracy"] = rl.answer_accuracy(params, config, tok, probe, rewards.exact_answer(),
                                              max_new_tokens=FLAGS.digits + 2, prompts=probe_ids)
        return seen["accuracy"]

    def competent(step: int, state) -> bool:
        return step % 25 == 0 and measure(state["params"]) >= FLAGS.sft_target

    print(f"SFT start: a fresh tiny V3.2 ({dsjax.count_params(dsjax.abstract_params(config)) / 1e6:.1f}M params) on "
          f"{files['sft']}, until {FLAGS.sft_target:.0%} of training problems are answered (at most {n} steps)")
    res = run(rc, stop_when=competent)
    if not res.stopped_early:
        measure(res.state["params"])
    with open(marker, "w") as f:
        json.dump({"step": res.step, "accuracy": seen["accuracy"]}, f)
    print(f"SFT: {res.step} steps, loss {res.rows[0]['ce']:.3f} -> {res.rows[-1]['ce']:.3f} nats/token, "
          f"training-problem accuracy {seen['accuracy']:.3f}")
    return res.paths["checkpoints"]


def build():
    """Flags -> (rl.RLConfig, reward, accuracy); every flag error raised here."""
    from dsjax.train import rl

    if FLAGS.steps < 1:
        raise FlagError(f"--steps={FLAGS.steps} must be >= 1.")
    options = {k: getattr(FLAGS, k) for k in ("dtype", "param_dtype") if getattr(FLAGS, k)}
    reward, accuracy = reward_functions()
    tc = train_config(FLAGS.schedule_steps or FLAGS.steps)  # flag errors before any work
    import sharding

    try:
        parallel = sharding.parallelism_from_spec(FLAGS.mesh)
    except ValueError as e:
        raise FlagError(f"--mesh: {e}") from None
    if FLAGS.task == "addition":
        import addition_task

        for name in ("init_ckpt", "prompts", "eval_prompts", "tokenizer"):
            if getattr(FLAGS, name):
                raise FlagError(f"--{name} is for --task=file; the addition task makes its own.")
        if not 1 <= FLAGS.digits <= 6:
            raise FlagError(f"--digits={FLAGS.digits}: use 1 to 6.")
        if FLAGS.sft_steps < 1:
            raise FlagError(f"--sft_steps={FLAGS.sft_steps} must be >= 1.")
        files = addition_task.write(os.path.join(FLAGS.workdir, "task"), digits=FLAGS.digits, heldout=FLAGS.heldout)
        init = sft_start(FLAGS.workdir, files)
        prompts, held, tok, max_new = files["prompts"], files["heldout"], files["tokenizer"], FLAGS.digits + 2
    else:
        for name in ("init_ckpt", "prompts"):
            if not getattr(FLAGS, name):
                raise FlagError(f"--task=file needs --{name}.")
        init, prompts, held = FLAGS.init_ckpt, FLAGS.prompts, FLAGS.eval_prompts
        tok = FLAGS.tokenizer or FLAGS.init_ckpt
        max_new = 512
    rc = rl.RLConfig(
        train=tc, prompts=prompts, tokenizer=tok,
        steps=FLAGS.steps, workdir=os.path.join(FLAGS.workdir, "grpo"), init_ckpt=init, model_options=options,
        prompts_per_step=FLAGS.prompts_per_step, max_new_tokens=FLAGS.max_new_tokens or max_new,
        max_prompt_tokens=FLAGS.max_prompt_tokens,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, updates_per_rollout=FLAGS.updates_per_rollout,
        keep_routing=FLAGS.keep_routing, keep_selection=FLAGS.keep_selection, chat=FLAGS.chat,
        eval_prompts=held, eval_every=FLAGS.eval_every, save_every=FLAGS.save_every, keep=FLAGS.keep,
        resume=FLAGS.resume and (FLAGS.task == "file"
                                 or os.path.isdir(os.path.join(FLAGS.workdir, "grpo", "checkpoints"))),
        seed=FLAGS.seed, parallel=parallel, progress=FLAGS.progress)
    return rc, reward, accuracy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    from dsjax.train import rl

    rc, reward, accuracy = build()
    print(f"GRPO: {rc.steps} steps of {rc.prompts_per_step} prompts x {rc.train.grpo.group_size} samples "
          f"(temperature {rc.train.grpo.temperature}), {'LoRA' if rc.train.lora else 'full'} fine-tuning, lr "
          f"{rc.train.optim.learning_rate:g}; held-out evaluation every {rc.eval_every} steps")
    res = rl.run(rc, reward, accuracy)
    for k in ("checkpoints", "tensorboard", "metrics", "curve"):
        print(f"  {k:12s} {res.paths[k]}")
    before, after = res.accuracy
    if before is None:
        print(f"{'preempted at' if res.preempted else 'finished'} step {res.step} (no --eval_prompts: no held-out "
              "accuracy)")
    else:
        print(f"held-out accuracy: {before:.3f} -> {after:.3f}")
    return 0


if __name__ == "__main__":
    cli.run(main, "grpo.py")
