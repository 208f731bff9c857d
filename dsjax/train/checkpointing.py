"""Training checkpoints: an Orbax CheckpointManager (async saves every N steps, keep the last K), and
SIGTERM handling.

Each checkpoint step directory holds three items:
    state  params, optimizer state, step, RNG                          (Orbax StandardSave, OCDBT)
           (a LoRA run: its adapters and only the base leaves it changes; the frozen base is reloaded
           from the run's --init_ckpt or seed, see trainer._to_save)
    data   the grain iterator state, one JSON file per process           (grain.checkpoint.CheckpointSave)
    meta   model config, stage and data settings                         (JSON)
Everything that decides the next step is in there, so a resumed run continues bit-identically.

Atomicity: Orbax writes a step into a temporary directory and renames it only once every item is
committed, so a process killed mid-save (kill -9) leaves the previous checkpoint intact and the partial
one invisible; leftovers are removed when the next manager opens the directory.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class TrainCheckpointer:
    """Save / restore training state, data-iterator state and metadata under `directory`.

    save_every: steps between periodic saves (`save` is a no-op on other steps unless force=True);
    keep: how many of the newest checkpoints to keep; async_save: write in a background thread while
    training continues (call `wait()` before reading the files or exiting).
    """

    def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1.")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving (asynchronously) if `step` is due or force; returns whether a save started."""
        import grain

        if force and step in self.manager.all_steps():
            return False  # already saved (e.g. a periodic save on the final step)
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(dict(meta))), force=force)

    def restore(self, state_like: Any, data_iter: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure, dtypes and shardings of `state_like`; sets `data_iter`'s position.

        Returns (state, meta). Raises FileNotFoundError when there is no checkpoint.
        """
        import grain

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def read_state(self, step: int | None = None) -> Any:
        """The saved state as a plain tree (no template), e.g. to start a new stage from its params."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """Turns SIGTERM (a preemption notice) into a flag the training loop polls between steps.

    The loop then saves a checkpoint at the current step and exits cleanly instead of dying mid-step.
    A second SIGTERM while the first is being handled is ignored (the save must be allowed to finish).
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self._event.is_set()
