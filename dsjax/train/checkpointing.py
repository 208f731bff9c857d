"""Training checkpoints: an Orbax CheckpointManager (async saves every N steps, keep the last K), and
SIGTERM handling.

Each checkpoint step directory holds three items:
    state  params, optimizer state, step, RNG                          (Orbax StandardSave, OCDBT)
           (a LoRA run: its adapters and only the base leaves it changes; the frozen base is reloaded
           from the run's --init_ckpt or seed, see trainer.to_save)
    data   the grain iterator state, one JSON file per process           (grain.checkpoint.CheckpointSave)
    meta   model config, stage and data settings, and a checksum of every state array   (JSON)
Everything that decides the next step is in there, so a resumed run continues bit-identically.

Integrity: `restore` recomputes each array's checksum (checkpoints/integrity.py) and refuses a step whose
state differs from what was saved, saying which array and whether an earlier step is intact; storage
errors (a missing or truncated chunk) are the same one CheckpointError. A failed async save surfaces at
the next step (`check`), not silently later.

Atomicity: Orbax writes a step into a temporary directory and renames it only once every item is
committed, so a process killed mid-save (kill -9) leaves the previous checkpoint intact and the partial
one invisible; leftovers are removed when the next manager opens the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from typing import Any, Iterator, Mapping

import jax
import orbax.checkpoint as ocp

from checkpoints import diskspace, integrity, orbax_io
from checkpoints.safetensors_io import CheckpointError

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
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving (asynchronously) if `step` is due or force; returns whether a save started."""
        import grain

        if force and step in self.manager.all_steps():
            return False  # already saved (e.g. a periodic save on the final step)
        if not force and not self.manager.should_save(step):
            return False
        diskspace.require_free(self.directory, sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count(),
                               f"saving the step-{step} checkpoint")
        meta = dict(meta, checksums=integrity.by_name(integrity.device_checksums(state)))
        with self._save_errors():  # Orbax raises an earlier async save's failure here too
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                meta=ocp.args.JsonSave(meta)), force=force)

    @contextlib.contextmanager
    def _save_errors(self, *, reported_once: bool = False) -> Iterator[None]:
        """Whatever a (possibly async, earlier) save hit becomes one OSError (`_save_failed`); with
        reported_once, a failure already raised once is not raised again (close after a failed save)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax re-raises whatever the writer thread hit
            if not (reported_once and self._failed):
                self._failed = True
                raise _save_failed(e, self.directory, self.all_steps()) from None

    def check(self) -> None:
        """Raise the error of an async save that failed (disk full, ...) now, as one OSError, so training
        stops at the next step instead of going on without checkpoints."""
        with self._save_errors():
            self.manager.check_for_errors()

    def read_state(self, step: int | None = None) -> Any:
        """The saved state as a plain tree (no template), e.g. to inspect a run; no checksum check (see
        `checkpoints.load` for a run's weights, checked)."""
        step = self.latest_step() if step is None else step
        with orbax_io.storage_errors(os.path.join(self.directory, str(step))):
            return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def wait(self) -> None:
        with self._save_errors():
            self.manager.wait_until_finished()
        self.check()

    def close(self) -> None:
        """Finish pending saves and release the manager; a failure already reported is not raised again."""
        with self._save_errors(reported_once=True):
            self.manager.wait_until_finished()
            self.manager.close()

    def _restore_step(self, step: int, abstract: Any, data_iter: Any) -> tuple[Any, dict]:
        import grain

        where = os.path.join(self.directory, str(step))
        with orbax_io.storage_errors(where, hint=""):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        bad = integrity.first_mismatch(meta.pop("checksums", {}), integrity.by_name(out["state"]))
        if bad:
            raise CheckpointError(f"{where} is damaged: array {bad} of its state does not match the checksum "
                                  "written with it.")
        return out["state"], meta

    def restore(self, state_like: Any, data_iter: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure, dtypes and shardings of `state_like`; sets `data_iter`'s position.

        Returns (state, meta). Raises FileNotFoundError when there is no checkpoint, and one CheckpointError
        when the step is damaged (naming the array, and the newest earlier step that is intact, if any).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        try:
            return self._restore_step(step, abstract, data_iter)
        except CheckpointError as e:
            for earlier in sorted((s for s in self.all_steps() if s < step), reverse=True):
                try:
                    self._restore_step(earlier, abstract, data_iter)
                except CheckpointError:
                    continue
                later = [s for s in self.all_steps() if s > earlier]
                raise CheckpointError(f"{str(e).rstrip()} Step {earlier} is intact: delete "
                                      f"{', '.join(os.path.join(self.directory, str(s)) for s in later)} and rerun "
                                      "to continue from it.") from None
            raise CheckpointError(f"{str(e).rstrip()} No earlier step is intact; start the run again.") from None

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])



def _save_failed(e: BaseException, directory: str, steps: list[int]) -> OSError:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    code = errno.ENOSPC if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e) else \
        (e.errno if isinstance(e, OSError) and e.errno else errno.EIO)
    done = [s for s in steps if os.path.isdir(os.path.join(directory, str(s)))]
    last = f"step {done[-1]} is the last complete checkpoint" if done else "no checkpoint was completed"
    return OSError(code, f"saving a checkpoint failed ({text}); training stopped, {last}", directory)


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
