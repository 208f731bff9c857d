"""Subprocess of test_train_resume.py: save a checkpoint, start the next one, and die by SIGKILL mid-save.

    python train_kill_helper.py DIR
"""

import os
import signal
import sys

import grain
import jax
import jax.numpy as jnp

from dsjax.train.checkpointing import TrainCheckpointer


def main(directory: str) -> None:
    ck = TrainCheckpointer(directory, save_every=1, keep=5)
    it = iter(grain.MapDataset.range(100).to_iter_dataset().batch(2))
    state = {"step": jnp.int32(1), "w": jnp.full((2048, 2048), 1.0), "rng": jax.random.key_data(jax.random.key(0))}
    next(it)
    ck.save(1, state, it, {"step": 1})
    ck.wait()
    next(it)
    state = {**state, "step": jnp.int32(2), "w": state["w"] * 2}  # 16 MiB: the async write takes a while
    ck.save(2, state, it, {"step": 2})
    print("SAVE_STARTED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1])
