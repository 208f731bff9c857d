"""Fine-tune (or pre-train) a DeepSeek V3.2 / V3 model with dsjax.

    python experiments/finetune.py --flagfile=experiments/configs/kjv_tiny.flags
    python experiments/finetune.py --config=tiny --data=corpus.jsonl --tokenizer=tokenizer.json --steps=200
    python experiments/finetune.py --init_ckpt=/ckpt/v32 --stage=indexer_warmup --data=... --mesh=expert=8,fsdp=4

Stages (spec §10): sft (language modelling / SFT; prompt tokens of chat data are not trained),
indexer_warmup (dense attention, only the lightning indexer trains on the KL to the main attention),
sparse (DSA on, everything trains; the indexer on the KL over its selected keys).

Outputs in --workdir: checkpoints/ (Orbax, async, every --save_every steps, last --keep kept),
tensorboard/ (scalars), metrics.jsonl, loss_curve.png. --resume continues a run bit-identically;
SIGTERM saves the current step and exits 0.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax import cli  # noqa: E402

FLAGS = flags.FLAGS
# model
flags.DEFINE_string("config", None, "preset model config (tiny, tiny-v3, small, deepseek-v3.2, ...) for a "
                    "from-scratch run; ignored with --init_ckpt")
flags.DEFINE_string("init_ckpt", None, "start from: a converted Orbax checkpoint, an HF directory, or a dsjax "
                    "training workdir's checkpoints/ (e.g. stage 2 from the indexer warm-up)")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_string("param_dtype", "float32", "master-weight dtype (optimizer state follows it)")
flags.DEFINE_integer("index_topk", None, "override the indexer top-k (small models, tests)")
flags.DEFINE_integer("vocab_size", None, "override the preset's vocab_size (from-scratch runs with your tokenizer; "
                     "ignored with --init_ckpt)")
# stage / objective
flags.DEFINE_enum("stage", "sft", ["sft", "indexer_warmup", "sparse"], "training stage (spec §10)")
flags.DEFINE_float("mtp_weight", 0.1, "λ: weight of the MTP loss (0 disables MTP)")
flags.DEFINE_float("balance_alpha", 1e-4, "α: sequence-wise balance loss weight")
flags.DEFINE_float("bias_update_rate", 1e-3, "γ: aux-loss-free router bias step (0 disables)")
flags.DEFINE_float("indexer_loss_weight", 1.0, "weight of the indexer KL loss")
flags.DEFINE_integer("lora_rank", 0, "LoRA rank (0 = full fine-tuning)")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: rank)")
flags.DEFINE_list("lora_targets", ["attn"], "LoRA targets: attn (MLA projections), shared, experts")
# optimizer
flags.DEFINE_integer("steps", 1000, "optimizer steps in total (a resumed run continues up to this)")
flags.DEFINE_integer("schedule_steps", None, "length of the lr schedule (default --steps); lets a run train a "
                     "prefix of a longer schedule and a later --resume continue it")
flags.DEFINE_float("lr", 3e-4, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 100, "linear warm-up steps")
flags.DEFINE_float("min_lr_ratio", 0.1, "final lr as a fraction of --lr (cosine decay)")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only)")
flags.DEFINE_float("b1", 0.9, "Adam beta1")
flags.DEFINE_float("b2", 0.95, "Adam beta2")
flags.DEFINE_float("clip_norm", 1.0, "global-norm gradient clipping (0 = off)")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per optimizer step")
flags.DEFINE_integer("ce_chunk_mb", 1024, "f32 logits the loss holds at once per device, in MiB (the [B, L, vocab] "
                     "logits are computed in chunks of positions; 0 = all at once)")
flags.DEFINE_string("remat", "full", "rematerialisation policy of the layer scan: full, dots, dots_no_batch, "
                    "none (save everything), off (no jax.checkpoint)")
# data
flags.DEFINE_list("data", None, "data files: .jsonl ({'text'} or {'messages'}), text, .array_record")
flags.DEFINE_enum("data_format", "auto", ["auto", "jsonl", "text", "arrayrecord"], "force a data format")
flags.DEFINE_string("tokenizer", None, "tokenizer.json (or a directory holding one)")
flags.DEFINE_integer("seq_len", 1024, "tokens per packed row")
flags.DEFINE_integer("batch_size", 8, "rows per optimizer step (global, all micro-batches)")
flags.DEFINE_enum("packing", "first_fit", ["first_fit", "concat"], "first_fit: whole documents + padding; "
                  "concat: concatenate and split")
flags.DEFINE_integer("epochs", None, "passes over the data (default: repeat until --steps)")
flags.DEFINE_integer("seed", 0, "seed of the params init, LoRA init, data shuffle and RNG")
# run
flags.DEFINE_string("workdir", None, "output directory (checkpoints, tensorboard, metrics, loss curve)")
flags.DEFINE_integer("save_every", 100, "checkpoint every N steps (async)")
flags.DEFINE_integer("keep", 3, "checkpoints to keep")
flags.DEFINE_bool("resume", False, "continue the run in --workdir from its latest checkpoint")
flags.DEFINE_string("mesh", None, "device mesh, e.g. data=2,fsdp=4 or expert=8,tensor=2 (default: one device)")
flags.DEFINE_string("export_hf", None, "after training, export HF safetensors here (LoRA merged)")
flags.DEFINE_bool("progress", True, "show a progress bar")

flags.mark_flags_as_required(["data", "tokenizer", "workdir"])


class FlagError(ValueError):
    pass


def parse_mesh(spec: str | None):
    """The run's layout (`sharding.parallelism_from_spec`) of --mesh; None for one device."""
    import sharding

    try:
        return sharding.parallelism_from_spec(spec)
    except ValueError as e:
        raise FlagError(f"--mesh: {e}") from None


def build_run_config():
    """Flags -> trainer.RunConfig (every flag error raised here, before any compile)."""
    import dsjax
    from dsjax import lora
    from dsjax.train import data, schedule, step, trainer

    if FLAGS.config is None and FLAGS.init_ckpt is None:
        raise FlagError("pass --config=PRESET for a new model or --init_ckpt=DIR to start from a checkpoint.")
    model = None
    if FLAGS.config is not None:  # with --init_ckpt: must agree with the checkpoint's (checked on load)
        try:
            model = dsjax.Config.preset(FLAGS.config)
        except ValueError as e:
            raise FlagError(f"--config: {e}") from None
    options = {"dtype": FLAGS.dtype, "param_dtype": FLAGS.param_dtype}
    if FLAGS.index_topk:
        options["index_topk"] = FLAGS.index_topk
    if FLAGS.vocab_size and model is not None:
        model = model.replace(vocab_size=FLAGS.vocab_size)
    total = FLAGS.schedule_steps or FLAGS.steps
    lora_cfg = None
    if FLAGS.lora_rank:
        lora_cfg = lora.LoraConfig(rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha, targets=tuple(FLAGS.lora_targets))
    tc = step.TrainConfig(
        stage=FLAGS.stage, grad_accum=FLAGS.grad_accum, remat=None if FLAGS.remat == "off" else FLAGS.remat,
        mtp_weight=FLAGS.mtp_weight, balance_alpha=FLAGS.balance_alpha, bias_update_rate=FLAGS.bias_update_rate,
        indexer_loss_weight=FLAGS.indexer_loss_weight, lora=lora_cfg,
        ce_chunk_bytes=FLAGS.ce_chunk_mb << 20 if FLAGS.ce_chunk_mb > 0 else None,
        optim=schedule.OptimConfig(learning_rate=FLAGS.lr, warmup_steps=min(FLAGS.warmup_steps, total),
                                   total_steps=total, min_lr_ratio=FLAGS.min_lr_ratio,
                                   weight_decay=FLAGS.weight_decay, b1=FLAGS.b1, b2=FLAGS.b2,
                                   clip_norm=FLAGS.clip_norm))
    dc = data.DataConfig(paths=tuple(FLAGS.data), seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                         format=FLAGS.data_format, packing=FLAGS.packing, seed=FLAGS.seed, num_epochs=FLAGS.epochs)
    for p in dc.paths:
        if not os.path.exists(p):
            raise FlagError(f"--data: file {p!r} does not exist.")
    return trainer.RunConfig(train=tc, data=dc, tokenizer=FLAGS.tokenizer, steps=FLAGS.steps, workdir=FLAGS.workdir,
                             model=model, model_options=options, init_ckpt=FLAGS.init_ckpt,
                             save_every=FLAGS.save_every, keep=FLAGS.keep, resume=FLAGS.resume, seed=FLAGS.seed,
                             parallel=parse_mesh(FLAGS.mesh), export_hf=FLAGS.export_hf, progress=FLAGS.progress)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    from dsjax.train import trainer

    res = trainer.run(build_run_config())
    print(trainer.summary(res))
    return 0


if __name__ == "__main__":
    cli.run(main, "finetune.py")
