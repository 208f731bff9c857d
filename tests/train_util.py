"""Shared helpers of the training tests: a small real BPE tokenizer and synthetic corpora on disk."""

from __future__ import annotations

import json
import os

import numpy as np

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + "." for _ in range(n)]


def make_tokenizer(path: str, vocab_size: int = 300):
    """A byte-level BPE (DeepSeek special tokens first: BOS = 0, EOS = 1) trained on the synthetic words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(200, seed=123), trainer)
    tok.save(path)
    return tok


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_text_corpus(path: str, n_docs: int, seed: int = 0) -> str:
    """Documents of a few sentences, separated by blank lines."""
    rng = np.random.default_rng(seed)
    sents = sentences(n_docs * 4, seed)
    docs = [" ".join(sents[4 * i: 4 * i + int(rng.integers(1, 5))]) for i in range(n_docs)]
    with open(path, "w") as f:
        f.write("\n\n".join(docs))
    return path


def write_array_record(path: str, records: list[bytes]) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    return path


def tmpfile(d, name: str) -> str:
    return os.path.join(str(d), name)


def leaf_pairs(before, after):
    """[(dotted path, before leaf, after leaf)] of two params trees with the same structure."""
    import jax

    return [(".".join(str(getattr(k, "key", k)) for k in kp), np.asarray(a), np.asarray(b))
            for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))]


def run_steps(fn, state, batch, n: int, metric: str):
    """n applications of a compiled train step; returns (state, [float(metrics[metric]) per step])."""
    values = []
    for _ in range(n):
        state, m = fn(state, batch)
        values.append(float(m[metric]))
    return state, values
