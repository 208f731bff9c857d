"""The dsjax Orbax checkpoint: layout, atomic commit behind a completion marker, streamed writes.

A checkpoint directory `O` is an ordinary Orbax PyTree checkpoint (tensorstore zarr arrays in an OCDBT
database; `ocp.PyTreeCheckpointer` / `ocp.StandardCheckpointer` restore it) of the params tree, plus

    O/dsjax_checkpoint.json   the completion marker: format, HF config, dtypes, which leaves are FP8,
                              a checksum per array and the size of every file (checkpoints/integrity.py)
    O/hf_assets/              tokenizer and other small files of the source HF directory (convert only)

Each array is stored under its tree path joined by dots ("moe.attn.wq_b"; an FP8 leaf as
"moe.attn.wq_b.qweight" and "moe.attn.wq_b.scale").

Atomicity: nothing is written into `O` itself. Writers fill `O.partial`, let Orbax finalize it (merge
the per-process OCDBT databases), write the marker last, then rename `O.partial` to `O`. `load` only
accepts a directory holding the marker, so a killed writer never leaves an `O` that loads.

Streaming: a `StreamedArray` leaf is produced block by block (e.g. one expert matrix at a time) by
`StreamedArrayHandler`, an Orbax `TypeHandler` that writes each block into its slice of the zarr array,
committing them in transactions of ~inflight_bytes/6 (one being read while the previous one commits).
Every committed block is journaled in `O.partial` with its checksum, so a rerun after a crash skips what
is on disk and still knows every array's checksum.

Integrity: `read_marker` refuses a checkpoint whose files are missing or truncated (naming the file);
`check_arrays` refuses restored arrays whose checksums differ from the recorded ones (naming the array);
`restore` turns any storage error into one CheckpointError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from checkpoints import diskspace, integrity
from checkpoints.safetensors_io import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "dsjax-orbax/1"
MARKER = "dsjax_checkpoint.json"
ASSETS = "hf_assets"
PARTIAL = ".partial"  # O.partial: the directory a writer fills before renaming it to O
_STATE = "dsjax_write_state.json"  # in O.partial: what is being written (a rerun resumes only the same job)
JOURNAL = "dsjax_write_journal.txt"  # in O.partial: keys of committed blocks, one per line
_ORBAX_METADATA = "_METADATA"


def leaf_name(path: Sequence[str]) -> str:
    """Orbax parameter name of a params-tree path: ("moe", "attn", "wq_b") -> "moe.attn.wq_b"."""
    return ".".join(path)


def tree_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of every leaf of a nested-dict tree, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, StreamedArray))[0]
    return [(tuple(k.key for k in p), v) for p, v in flat]


# --------------------------------------------------------------------------- streamed writes
@dataclasses.dataclass(frozen=True)
class Block:
    """One write of a streamed array: `produce()` returns the data for `array[index]`."""

    key: str  # unique within the checkpoint, one line of text; journaled once committed
    index: tuple[Any, ...]  # ints (stacked layer / expert) and slices
    produce: Callable[[], np.ndarray]
    out_bytes: int  # bytes of the produced block


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """An array leaf that is never whole in memory: written block by block at save time.

    `write_shape` is the shape of one full block (stacked axes 1); zarr chunks subdivide it, so blocks
    never share a chunk.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...]
    blocks: Sequence[Block]


class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Orbax TypeHandler writing `StreamedArray` leaves block by block with bounded memory.

    The arrays land exactly where Orbax's own handlers put a host array (same tensorstore spec), so any
    Orbax restore reads them; the value type is recorded as "np.ndarray".
    """

    def __init__(self, *, done: dict[str, tuple[str, str]], journal: TextIO | None, threads: int,
                 inflight_bytes: int, chunk_bytes: int, progress: bool):
        super().__init__()
        # done: block key -> (array name, block checksum), committed ones; grows as blocks commit
        self._done, self._journal = done, journal
        self._threads, self._inflight, self._chunk_bytes = threads, inflight_bytes, chunk_bytes
        self._progress = progress

    async def serialize(self, values: Sequence[StreamedArray], infos: Sequence[Any],
                        args: Sequence[Any] | None = None) -> list[Any]:
        # Everything is written (and committed) right here: there is no device copy to overlap with,
        # and Orbax then writes its metadata with no commit futures left to wait for.
        await self._write(values, infos)
        return []

    async def _open(self, v: StreamedArray, info: Any) -> ts.TensorStore:
        await info.await_path_creation()
        use_ocdbt = bool(info.is_ocdbt_checkpoint)
        spec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt=use_ocdbt, global_shape=v.shape, local_shape=v.write_shape, dtype=v.dtype,
            process_index=jax.process_index() if use_ocdbt else None,
            arg=ocp.SaveArgs(chunk_byte_size=self._chunk_bytes))
        # open=True: a resumed write reopens the array a killed run created (same spec, same metadata).
        return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)

    async def _write(self, values: Sequence[StreamedArray], infos: Sequence[Any]) -> None:
        from tqdm.auto import tqdm

        stores = [await self._open(v, info) for v, info in zip(values, infos)]
        todo = [(t, b, v, info.name) for t, v, info in zip(stores, values, infos) for b in v.blocks
                if b.key not in self._done]
        bar = tqdm(total=sum(x[1].out_bytes for x in todo), unit="B", unit_scale=True, desc="writing",
                   disable=not self._progress, mininterval=1.0)
        loop = asyncio.get_running_loop()
        committing: asyncio.Future | None = None
        try:
            with concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="dsjax-read") as pool:
                for batch in _batches(todo, self._inflight // 6):
                    # One transaction per batch: a commit (one OCDBT data file + manifest update, with
                    # fsyncs) per batch rather than per block halves the CPU time. Batch k+1 is read while
                    # batch k commits; each is held ~2-3 times (our blocks, tensorstore's staged chunks,
                    # the OCDBT data file being encoded), hence batches of inflight/6.
                    txn = ts.Transaction()

                    async def stage(t: ts.TensorStore, b: Block, v: StreamedArray, name: str,
                                    txn: ts.Transaction = txn) -> tuple[Block, str, str]:
                        a = await loop.run_in_executor(pool, b.produce)
                        check = await loop.run_in_executor(pool, integrity.block_checksum, a, b.index, v.shape)
                        # Referenced, not copied, until the transaction has committed it.
                        await t.with_transaction(txn)[b.index].write(
                            a, can_reference_source_data_indefinitely=True).copy
                        return b, name, check

                    staged = await asyncio.gather(*(stage(*x) for x in batch))
                    if committing is not None:
                        await committing
                    committing = asyncio.ensure_future(self._commit(txn, staged, bar))
                if committing is not None:
                    await committing
                    committing = None
        finally:
            if committing is not None:  # a block failed: let the previous batch finish committing
                await asyncio.gather(committing, return_exceptions=True)
            bar.close()

    async def _commit(self, txn: ts.Transaction, staged: list[tuple[Block, str, str]], bar: Any) -> None:
        await txn.commit_async()
        for b, name, check in staged:
            self._done[b.key] = (name, check)
        if self._journal is not None:
            self._journal.write("".join(f"{b.key}\t{name}\t{check}\n" for b, name, check in staged))
            self._journal.flush()
        bar.update(sum(b.out_bytes for b, _, _ in staged))

    def checksums(self) -> dict[str, str]:
        """Array name -> checksum, from every committed block (this run's and the journaled ones)."""
        parts: dict[str, list[str]] = {}
        for name, check in self._done.values():
            parts.setdefault(name, []).append(check)
        return {n: integrity.combine(p) for n, p in parts.items()}


def _batches(todo: list[tuple[Any, ...]], limit: int) -> list[list[tuple[Any, ...]]]:
    """Consecutive blocks grouped into batches of at most `limit` output bytes (big blocks alone)."""
    out: list[list[tuple[Any, Block]]] = []
    size = 0
    for item in todo:
        if not out or size + item[1].out_bytes > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item[1].out_bytes
    return out


# --------------------------------------------------------------------------- directories and commit
def partial_dir(out_dir: str | os.PathLike) -> epath.Path:
    p = epath.Path(os.path.abspath(os.fspath(out_dir)))
    return p.parent / (p.name + PARTIAL)


def _write_json(path: epath.Path, obj: Any) -> None:
    tmp = path.parent / (path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: epath.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out: epath.Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out_dir, delete it, or pass "
                              "overwrite=True (--overwrite) to replace it once the new one is complete.")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; it will not be replaced.")


def _commit(part: epath.Path, out: epath.Path, marker: Mapping[str, Any], overwrite: bool) -> None:
    """Marker last (with the manifest of every other file), then rename O.partial -> O (replacing an old O
    only now that the new one is whole)."""
    for name in (_STATE, JOURNAL):
        if (part / name).exists():
            (part / name).unlink()
    _write_json(part / MARKER, dict(marker, files=integrity.manifest(part, exclude=(MARKER,))))
    _check_target(out, overwrite)
    move_into_place(part, out)


def move_into_place(part: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory `part` to `out`; an existing `out` is only removed afterwards."""
    part, out = epath.Path(part), epath.Path(out)
    _fsync_dir(part)
    old = None
    if out.exists():
        old = out.parent / (out.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(part, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def _read_journal(path: epath.Path) -> dict[str, tuple[str, str]]:
    """block key -> (array name, checksum) of the committed blocks a journal lists."""
    done = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        key, name, check = (line.split("\t") + ["", ""])[:3]
        if name and len(check) == 16:  # a line cut short by a kill: that block is simply rewritten
            done[key] = (name, check)
    return done


def _open_partial(out: epath.Path, state: Mapping[str, Any]) -> tuple[epath.Path, dict[str, tuple[str, str]] | None]:
    """Create O.partial, or reopen it to resume the same job; returns (dir, blocks already committed),
    blocks None when O.partial is complete (only its rename is left)."""
    part = partial_dir(out)
    if part.exists():
        contents = set(os.listdir(part))
        if MARKER in contents:
            return part, None
        prev = None
        if _STATE in contents:
            try:
                prev = json.loads((part / _STATE).read_text())
            except (OSError, json.JSONDecodeError):
                prev = None
        if prev == dict(state):
            done = _read_journal(part / JOURNAL)
            log.warning("resuming the interrupted write in %s (%d blocks already committed)", part, len(done))
            return part, done
        if contents and _STATE not in contents:
            raise CheckpointError(f"{part} exists but was not created by dsjax (no {_STATE}); move it away "
                                  "or delete it, then rerun.")
        log.warning("%s holds an interrupted write of a different job; starting over", part)
        shutil.rmtree(part)
    part.mkdir(parents=True)
    _write_json(part / _STATE, dict(state))
    return part, {}


def write_streamed(out_dir: str | os.PathLike, tree: Any, marker: Mapping[str, Any], *, state: Mapping[str, Any],
                   assets: Iterable[str] = (), overwrite: bool = False, threads: int = 2,
                   inflight_bytes: int = 512 << 20, chunk_bytes: int = 8 << 20, compress: bool = True,
                   progress: bool = True) -> None:
    """Write a tree of `StreamedArray`s as a dsjax checkpoint at `out_dir`, atomically and resumably.

    state: a JSON-able description of the job (source files, options); a rerun with the same state
    resumes an interrupted `out_dir.partial`, a different one starts over. assets: files copied to
    O/hf_assets. compress: zstd chunks (Orbax's default). Peak host memory ~ the Python / jax / Orbax
    baseline (~250 MB) + inflight_bytes.
    """
    out = epath.Path(os.path.abspath(os.fspath(out_dir)))
    _check_target(out, overwrite)
    part, done = _open_partial(out, state)
    if done is None:  # written and marked by a run killed before its rename: only that is left
        move_into_place(part, out)
        return
    todo = sum(b.out_bytes for _, v in tree_paths(tree) if isinstance(v, StreamedArray) for b in v.blocks
               if b.key not in done)
    diskspace.require_free(part, todo, f"writing {out}")
    with open(part / JOURNAL, "a") as journal:
        handler = StreamedArrayHandler(done=done, journal=journal, threads=threads, inflight_bytes=inflight_bytes,
                                       chunk_bytes=chunk_bytes, progress=progress)
        registry = ocp.type_handlers.create_type_handler_registry(
            (StreamedArray, handler), (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
        h = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)
        h.save(part, args=ocp.args.PyTreeSave(tree))
        h.finalize(part)
    assets = list(assets)
    if assets:
        (part / ASSETS).mkdir(exist_ok=True)
        for a in assets:
            shutil.copy2(a, part / ASSETS / os.path.basename(a))
    plain = {leaf_name(p): x for p, x in tree_paths(tree) if not isinstance(x, StreamedArray)}
    checks = {**(integrity.device_checksums(plain) if plain else {}), **handler.checksums()}
    _commit(part, out, dict(marker, checksums=checks), overwrite)


def write_arrays(out_dir: str | os.PathLike, tree: Any, marker: Mapping[str, Any], *, overwrite: bool = False
                 ) -> None:
    """Write a tree of (possibly sharded, multi-host) jax / numpy arrays as a dsjax checkpoint.

    Every process calls this; each writes its own shards (Orbax), process 0 commits.
    """
    out = epath.Path(os.path.abspath(os.fspath(out_dir)))
    part = partial_dir(out)
    primary = jax.process_index() == 0
    named = {leaf_name(p): x for p, x in tree_paths(tree)}
    marker = dict(marker, checksums=integrity.device_checksums(named))  # global values: every process agrees
    diskspace.require_free(out.parent, sum(x.nbytes for x in named.values()) // jax.process_count(),
                           f"saving {out}")
    if primary:
        _check_target(out, overwrite)
        if part.exists():
            shutil.rmtree(part)
        part.mkdir(parents=True)
    _sync("dsjax_save_start")
    h = ocp.PyTreeCheckpointHandler()
    h.save(part, args=ocp.args.PyTreeSave(tree))
    _sync("dsjax_save_written")
    if primary:
        h.finalize(part)
        _commit(part, out, marker, overwrite)
    _sync("dsjax_save_committed")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- reading
def read_marker(ckpt_dir: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """The marker of a complete dsjax checkpoint; one clear CheckpointError otherwise (also for a missing or
    truncated file, unless check_files=False: reading only the metadata)."""
    d = epath.Path(os.path.abspath(os.fspath(ckpt_dir)))
    if not d.is_dir():
        if partial_dir(d).exists():
            raise CheckpointError(f"{d} does not exist, but {partial_dir(d)} does: the write was interrupted. "
                                  "Rerun the same `python -m checkpoints.convert` command to finish it.")
        raise CheckpointError(f"{d} is not a directory; pass the folder written by checkpoints.convert / save.")
    if not (d / MARKER).exists():
        raise CheckpointError(f"{d} is not a complete dsjax checkpoint (no {MARKER}); it was not written by "
                              "checkpoints.convert / checkpoints.save, or its write did not finish.")
    try:
        marker = json.loads((d / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / MARKER} is unreadable ({e}); the checkpoint is damaged.") from None
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{d}: checkpoint format {marker.get('format')!r}, this dsjax reads {FORMAT!r}.")
    if not (d / _ORBAX_METADATA).exists():
        raise CheckpointError(f"{d}: the Orbax metadata ({_ORBAX_METADATA}) is missing; the checkpoint is damaged.")
    problem = integrity.manifest_problem(d, marker.get("files", {}) if check_files else {})
    if problem:
        raise CheckpointError(f"{d} is damaged: {problem}. {REDO}")
    return marker


REDO = "Re-create it (rerun the convert / save / export that wrote it) or restore it from a copy."


def check_arrays(ckpt_dir: str | os.PathLike, marker: Mapping[str, Any], named: Mapping[str, Any]) -> None:
    """Compare the checksums of restored arrays (`named`: orbax leaf name -> array, in their stored dtype)
    with the ones recorded at save; one CheckpointError naming the first array that differs."""
    bad = integrity.first_mismatch(marker.get("checksums", {}), named)
    if bad:
        raise CheckpointError(f"{ckpt_dir} is damaged: array {bad} does not match the checksum written with "
                              f"it (its data files under {ckpt_dir} were changed after the save). {REDO}")


def stored_shapes(ckpt_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array in the checkpoint, from Orbax's metadata (no data read)."""
    with storage_errors(os.fspath(ckpt_dir)):  # (also keeps Orbax's "no _CHECKPOINT_METADATA" warning quiet)
        meta = ocp.PyTreeCheckpointer().metadata(epath.Path(os.path.abspath(os.fspath(ckpt_dir))))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}
    for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[leaf_name([k.key for k in path])] = (tuple(m.shape), np.dtype(m.dtype))
    return out


def restore(ckpt_dir: str | os.PathLike, abstract: Any) -> Any:
    """Restore arrays straight into the shardings and dtypes of `abstract` (jax.ShapeDtypeStruct leaves).

    Orbax reads, on every host, only the chunks that overlap that host's shards.
    """
    d = epath.Path(os.path.abspath(os.fspath(ckpt_dir)))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    with storage_errors(f"{d}"):
        return ocp.PyTreeCheckpointer().restore(d, args=ocp.args.PyTreeRestore(item=abstract,
                                                                                restore_args=restore_args))


@contextlib.contextmanager
def storage_errors(what: str, hint: str = REDO) -> Iterator[None]:
    """Any error Orbax / tensorstore raise while reading `what` becomes one CheckpointError (their
    log lines are held back: a missing chunk otherwise prints hundreds of lines)."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / OSError / its own kinds
        raise CheckpointError(f"{what} is damaged: its data cannot be read ({_first_line(e)}). {hint}") from None
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _first_line(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = (str(e) or type(e).__name__).strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


def open_array(ckpt_dir: str | os.PathLike, name: str, context: ts.Context | None = None) -> ts.TensorStore:
    """The tensorstore array `name` of a checkpoint, for reading slices without restoring a whole leaf.

    Share one `context` (`ocp.type_handlers.get_ts_context()`) across the arrays of a checkpoint.
    """
    d = epath.Path(os.path.abspath(os.fspath(ckpt_dir)))
    meta = json.loads((d / _ORBAX_METADATA).read_text())
    use_ocdbt = bool(meta.get("use_ocdbt", True))
    context = context or ocp.type_handlers.get_ts_context()
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=d, is_ocdbt_checkpoint=use_ocdbt,
                                       use_zarr3=bool(meta.get("use_zarr3", False)), ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    return ts.open(ts.Spec(spec), open=True, read=True, context=context).result()
