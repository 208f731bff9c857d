"""Training: the jitted step (losses, MoE balancing, MTP, DSA indexer stages), LoRA, grain data, Orbax
checkpoints, and the loop shared by experiments/finetune.py and experiments/quickstart.py.

    step.py           TrainConfig, init_state, train_step / compiled_step
    losses.py         cross-entropy with masks (chunked over the head), MTP targets, balance loss, router-bias update
    schedule.py       AdamW + warm-up/cosine + clipping
    lora.py           LoraConfig, init / apply / merge
    data.py           DataConfig, grain pipeline (JSONL / text / ArrayRecord -> packed batches)
    checkpointing.py  TrainCheckpointer (Orbax CheckpointManager), PreemptionGuard (SIGTERM)
    metrics.py        TensorBoard scalars, metrics.jsonl, loss-curve PNG
    trainer.py        RunConfig, run()
    grpo.py           GRPO's objective, advantages, rollout batches (spec §10.5)
    rewards.py        reward functions on decoded text
    rl.py             RLConfig, run(): the GRPO loop (rollouts from dsjax.generate, the stage="grpo" step)
"""

from dsjax.train.checkpointing import PreemptionGuard, TrainCheckpointer
from dsjax.train.data import DataConfig, DataError, make_iterator
from dsjax.lora import LoraConfig
from dsjax.train.schedule import OptimConfig, lr_schedule, make_optimizer
from dsjax.train.step import STAGES, TrainConfig, compiled_step, init_state, train_step
from dsjax.train.trainer import RunConfig, RunResult, run

__all__ = ["TrainConfig", "OptimConfig", "LoraConfig", "DataConfig", "DataError", "RunConfig", "RunResult",
           "STAGES", "init_state", "train_step", "compiled_step", "make_optimizer", "lr_schedule",
           "make_iterator", "TrainCheckpointer", "PreemptionGuard", "run"]
