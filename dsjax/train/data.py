"""Training data with grain: documents -> tokens -> packed rows -> batches, with a checkpointable iterator.

Sources (chosen by file extension, or `DataConfig.format`):
  * JSONL (`.jsonl`, `.json`): one document per line, `{"text": ...}` or chat `{"messages": [{"role", "content"}]}`
   (rendered by `dsjax.chat`; only the assistant turns are trained);
  * plain text (`.txt`, ...): documents separated by `text_separator` (a blank line by default);
  * ArrayRecord (`.array_record`): each record UTF-8 JSON as above, or raw UTF-8 text.

Pipeline (grain): source -> this process's shard (`ds[i::n]`) -> global shuffle(seed) -> repeat (each epoch
reshuffled) -> tokenize -> pack into rows of `seq_len` -> batch. Packing keeps documents apart: every row
carries `segment_ids` (1, 2, ... per document, 0 = padding) and `positions` restarting at 0 per document,
which the model uses so that attention and the DSA indexer's top-k never cross a document boundary.

A batch is a dict of numpy arrays (this process's rows):
    tokens       int32 [B, L]  model input
    targets      int32 [B, L]  the next token of the same document
    weights      f32   [B, L]  1 where the target is trained: 0 on padding and on prompt tokens (SFT chat)
    segment_ids  int32 [B, L]
    positions    int32 [B, L]

The iterator is a `grain.DatasetIterator`; its `get_state()` is saved with each checkpoint (see
`checkpointing.py`), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

from dsjax import chat
from dsjax.chat import BOS, EOS

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "text", "arrayrecord")
PACKINGS = ("first_fit", "concat")


class DataError(ValueError):
    """Bad training data or data flags; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into rows.

    batch_size is the global number of rows per optimizer step (all processes, all accumulation
    micro-batches); each process reads batch_size / shard_count of them from its own shard.
    packing: "first_fit" packs whole documents (truncated to seq_len + 1 tokens) into rows, padding the
    rest (SFT); "concat" concatenates documents and splits at seq_len (pre-training style, no padding).
    """

    paths: tuple[str, ...]
    seq_len: int
    batch_size: int
    format: str = "auto"
    packing: str = "first_fit"
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    text_separator: str = "\n\n"
    add_bos: bool = True
    add_eos: bool = True
    shard_index: int | None = None  # default jax.process_index()
    shard_count: int | None = None  # default jax.process_count()
    num_threads: int = 2  # tokenization threads (grain ReadOptions)
    chat_thinking: bool = False  # render chat records in thinking mode (dsjax.chat.encode_messages(thinking=))

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", tuple(p for p in self.paths.split(",") if p))
        if not self.paths:
            raise DataError("no data files given; pass --data=FILE[,FILE...] (JSONL, text or ArrayRecord).")
        if self.format not in FORMATS:
            raise DataError(f"data format {self.format!r} is unknown; use one of {FORMATS}.")
        if self.packing not in PACKINGS:
            raise DataError(f"packing {self.packing!r} is unknown; use one of {PACKINGS}.")
        if self.seq_len < 2:
            raise DataError(f"seq_len={self.seq_len} is too short; use at least 2 tokens.")
        if self.batch_size < 1:
            raise DataError(f"batch_size={self.batch_size} must be >= 1.")


# --------------------------------------------------------------------------------------------- reading
def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    low = path.lower()
    if low.endswith((".jsonl", ".json", ".jsonl.txt")):
        return "jsonl"
    if low.endswith((".array_record", ".arrayrecord")) or ".array_record-" in low:
        return "arrayrecord"
    return "text"


def _check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict) or not (isinstance(rec.get("text"), str) or isinstance(rec.get("messages"), list)):
        raise DataError(f'{where}: expected {{"text": "..."}} or {{"messages": [{{"role": ..., "content": ...}}]}}, '
                        f"got {str(rec)[:80]!r}.")
    return rec


_WARNED: set[str] = set()


def _utf8(raw: bytes, where: str) -> str:
    """Text of `raw`; bytes that are not UTF-8 become U+FFFD, with a warning naming `where` and how many (once
    per source: a corpus with stray Latin-1 bytes trains, but not silently)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        if where not in _WARNED:
            _WARNED.add(where)
            bad = text.count("\ufffd") - raw.count("\ufffd".encode())
            log.warning("%s: %d invalid UTF-8 sequence(s) (first at byte %d) replaced by U+FFFD; re-encode the "
                        "file as UTF-8 to keep them.", where, bad, e.start)
        return text


def read_jsonl(path: str, check: Callable[[Any, str], dict] | None = None) -> list[dict]:
    """The records of a JSONL file (one JSON object a line; non-UTF-8 bytes replaced with a warning), each
    passed through check(record, "FILE line N") (default: a training document, {"text"} or {"messages"});
    a bad line is one DataError naming it."""
    check = _check_record if check is None else check
    docs = []
    with open(path, "rb") as f:
        text = _utf8(f.read(), path)
    for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: U+2028 may sit inside a JSON string)
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}); fix or remove the line.") from None
        docs.append(check(rec, f"{path} line {n}"))
    return docs


def _read_text(path: str, separator: str) -> list[dict]:
    with open(path, "rb") as f:
        text = _utf8(f.read(), path)
    return [{"text": d.strip()} for d in text.split(separator) if d.strip()]


def _decode_record(raw: Any) -> dict:
    """An ArrayRecord record: UTF-8 JSON {"text"|"messages"} or raw UTF-8 text."""
    s = _utf8(bytes(raw), "ArrayRecord data") if isinstance(raw, (bytes, bytearray)) else raw
    if isinstance(s, str) and s.lstrip().startswith("{"):
        try:
            return _check_record(json.loads(s), "ArrayRecord record")
        except json.JSONDecodeError:
            pass
    return {"text": s} if isinstance(s, str) else _check_record(s, "ArrayRecord record")


def read_documents(cfg: DataConfig) -> grain.MapDataset:
    """A random-access grain dataset of documents ({"text"} or {"messages"} dicts, or raw ArrayRecord bytes)."""
    parts: list[grain.MapDataset] = []
    for path in cfg.paths:
        if not os.path.exists(path):
            raise DataError(f"data file {path!r} does not exist; check --data.")
        fmt = detect_format(path, cfg.format)
        if fmt == "arrayrecord":
            src = grain.sources.ArrayRecordDataSource([path])
            ds = grain.MapDataset.source(src).map(_decode_record)
        elif fmt == "jsonl":
            ds = grain.MapDataset.source(read_jsonl(path))
        else:
            ds = grain.MapDataset.source(_read_text(path, cfg.text_separator))
        if len(ds) == 0:
            raise DataError(f"data file {path!r} holds no documents; it is empty (or only whitespace).")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


# --------------------------------------------------------------------------------------------- tokenizing
def chat_segments(messages: Sequence[dict], *, thinking: bool = False) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) pieces in the V3.2 rendering of `dsjax.chat` (spec §11): one piece
    per message, and only assistant turns (reply, reasoning kept where the format keeps it, tool calls, EOS)
    are trained; system, user (with its `<think>` / `</think>` marker) and tool-result text are context.
    The BOS token is added by the tokenizing step."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"'messages' must be a list of {{'role': ..., 'content': ...}} dicts, got {str(messages)[:80]!r}.")
    last_user = chat._last_user(messages)
    try:
        return [(chat._render(i, messages, thinking, last_user), m.get("role") == "assistant")
                for i, m in enumerate(messages)]
    except ValueError as e:
        raise DataError(f"chat record: {e}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))


def _special_id(tokenizer: Any, token: str) -> int | None:
    fn = getattr(tokenizer, "token_to_id", None)
    return fn(token) if fn is not None else None


def vocab_size_of(tokenizer: Any) -> int:
    """Token count of a `tokenizers.Tokenizer` or a `dsjax.Tokenizer`."""
    fn = getattr(tokenizer, "get_vocab_size", None)
    return int(fn(with_added_tokens=True)) if fn is not None else int(tokenizer.vocab_size)


class Tokenize:
    """Document -> {"inputs", "targets", "weights"} of equal length (None for documents under 2 tokens).

    ids = [BOS] + tokens + [EOS]; inputs = ids[:-1], targets = ids[1:]; weights[i] = 1 iff target i is
    trained. With first_fit packing a document is truncated to max_len targets.
    """

    def __init__(self, tokenizer: Any, *, max_len: int | None, add_bos: bool, add_eos: bool,
                 thinking: bool = False):
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.max_len = max_len
        self.bos = _special_id(tokenizer, BOS) if add_bos else None
        self.eos = _special_id(tokenizer, EOS) if add_eos else None

    def __call__(self, doc: Any) -> dict[str, np.ndarray] | None:
        if not isinstance(doc, dict):
            doc = _decode_record(doc)
        if "messages" in doc:
            ids: list[int] = [] if self.bos is None else [self.bos]
            trained: list[bool] = [False] * len(ids)
            for text, train in chat_segments(doc["messages"], thinking=self.thinking):
                piece = _encode(self.tokenizer, text)
                ids += piece
                trained += [train] * len(piece)
        else:
            ids = ([] if self.bos is None else [self.bos]) + _encode(self.tokenizer, doc["text"])
            if self.eos is not None:
                ids.append(self.eos)
            trained = [True] * len(ids)
        if len(ids) < 2:
            return None
        n = len(ids) - 1 if self.max_len is None else min(len(ids) - 1, self.max_len)
        arr = np.asarray(ids, np.int32)
        return {"inputs": arr[:n], "targets": arr[1:n + 1], "weights": np.asarray(trained[1:n + 1], np.float32)}


def _finalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    seg = batch["inputs_segment_ids"].astype(np.int32)
    return {"tokens": batch["inputs"].astype(np.int32), "targets": batch["targets"].astype(np.int32),
            "weights": batch["weights"].astype(np.float32) * (seg > 0), "segment_ids": seg,
            "positions": batch["inputs_positions"].astype(np.int32)}


# --------------------------------------------------------------------------------------------- pipeline
def _shard(cfg: DataConfig) -> tuple[int, int]:
    if cfg.shard_index is not None and cfg.shard_count is not None:
        return cfg.shard_index, cfg.shard_count
    import jax

    return jax.process_index(), jax.process_count()


def make_dataset(cfg: DataConfig, tokenizer: Any, *, vocab_size: int | None = None) -> grain.IterDataset:
    """The batched grain IterDataset of this process's shard (see the module docstring)."""
    index, count = _shard(cfg)
    if cfg.batch_size % count:
        raise DataError(f"batch_size={cfg.batch_size} must be divisible by the {count} data shards (processes).")
    if vocab_size is not None and vocab_size_of(tokenizer) > vocab_size:
        raise DataError(f"the tokenizer has {vocab_size_of(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab_size}; use the model's tokenizer or a config with a larger vocab_size.")
    docs = read_documents(cfg)
    docs = docs[index::count]
    if len(docs) == 0:
        raise DataError(f"data shard {index}/{count} is empty: {cfg.paths} hold fewer documents than processes.")
    tok = Tokenize(tokenizer, max_len=cfg.seq_len if cfg.packing == "first_fit" else None,
                   add_bos=cfg.add_bos, add_eos=cfg.add_eos, thinking=cfg.chat_thinking)
    if not any(tok(docs[i]) is not None for i in range(min(len(docs), 64))):
        raise DataError(f"the first {min(len(docs), 64)} documents of {cfg.paths} tokenize to fewer than 2 tokens; "
                        "the dataset is effectively empty.")
    ds = docs.shuffle(seed=cfg.seed).repeat(cfg.num_epochs).map(tok)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=16))
    lengths = {"inputs": cfg.seq_len, "targets": cfg.seq_len, "weights": cfg.seq_len}
    rows = cfg.batch_size // count
    if cfg.packing == "first_fit":
        it = grain.experimental.FirstFitPackIterDataset(it, length_struct=lengths, num_packing_bins=max(rows, 4),
                                                         seed=cfg.seed, shuffle_bins=False)
    else:
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths)
    return it.batch(rows, drop_remainder=True).map(_finalize)


def make_iterator(cfg: DataConfig, tokenizer: Any, *, vocab_size: int | None = None) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a checkpointable iterator over batches."""
    return iter(make_dataset(cfg, tokenizer, vocab_size=vocab_size))


def next_batch(it: Iterable, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The next batch, with a clear error when a finite dataset cannot fill one."""
    try:
        return next(it)
    except StopIteration:
        raise DataError(f"{cfg.paths} ran out of data: not enough documents for another batch of "
                        f"{cfg.batch_size} rows x {cfg.seq_len} tokens (num_epochs={cfg.num_epochs}); "
                        "add data, raise num_epochs, or lower batch_size / steps.") from None


def load_tokenizer(path: str) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file (or a directory holding one)."""
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path!r} does not exist; pass --tokenizer=path/to/tokenizer.json.")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{path} is not a valid tokenizer.json ({e}).") from None
