"""The verifiable task `experiments/grpo.py` ships: multi-digit addition in the V3.2 chat format.

    user: "37+58="   assistant: "95"   (reward 1 iff the answer is exactly the sum)

Every pair (a, b) with a, b < 10**digits is a problem; a fixed split (its own seed, the same for every run
seed) holds out `heldout` of them, never seen by SFT or GRPO. `write(dir)` writes:
    tokenizer.json   a character-level tokenizer (digits, '+', '=') with DeepSeek's chat special tokens
    sft.jsonl        the training problems as chat records (SFT trains only the answer)
    prompts.jsonl    the same problems as GRPO prompt records {"prompt", "answer"}
    heldout.jsonl    the held-out problems, the same way
"""

from __future__ import annotations

import json
import os
import random

from dsjax import chat

CHARS = "0123456789+="
SPLIT_SEED = 20261201


def tokenizer():
    """A `tokenizers.Tokenizer`: one token per character of CHARS, plus the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(list(chat.SPECIAL_TOKENS) + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every character is its own token
    tok.add_special_tokens(list(chat.SPECIAL_TOKENS))
    tok.decoder = decoders.Fuse()
    return tok


def problems(digits: int, heldout: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs): a fixed shuffle of every pair below 10**digits."""
    hi = 10 ** digits
    pairs = [(a, b) for a in range(hi) for b in range(hi)]
    if not 0 < heldout < len(pairs):
        raise ValueError(f"heldout={heldout} must be in (0, {len(pairs)}) for {digits}-digit addition.")
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[heldout:], pairs[:heldout]


def record(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def write(directory: str, *, digits: int = 2, heldout: int = 500) -> dict[str, str]:
    """Write the task's files into `directory`; returns their paths by name."""
    os.makedirs(directory, exist_ok=True)
    train, held = problems(digits, heldout)
    paths = {k: os.path.join(directory, f) for k, f in (("tokenizer", "tokenizer.json"), ("sft", "sft.jsonl"),
                                                        ("prompts", "prompts.jsonl"), ("heldout", "heldout.jsonl"))}
    tokenizer().save(paths["tokenizer"])
    with open(paths["sft"], "w") as f:
        for a, b in train:
            r = record(a, b)
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["answer"]}]}) + "\n")
    for name, pairs in (("prompts", train), ("heldout", held)):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(record(a, b)) + "\n" for a, b in pairs)
    return paths


def model_config(digits: int = 2):
    """The `tiny` V3.2 layout (MLA, lightning indexer, grouped MoE routing with a correction bias) sized to
    this vocabulary; no MTP head (RL does not train it). index_topk covers the short rows: DSA selects
    every key here (rows are ~16 tokens), so the indexer is not exercised by this task."""
    import dsjax

    return dsjax.Config.preset("tiny", vocab_size=len(chat.SPECIAL_TOKENS) + len(CHARS) + 14,
                               max_position_embeddings=64, num_nextn_predict_layers=0,
                               index_topk=64 if digits <= 8 else 128)


def digit_reward(prompt: str, completion: str, example: dict) -> float:
    """Partial credit: the share of the answer's digits right, aligned from the units digit (a longer or
    shorter answer loses the unmatched places). A denser signal than exact match for a weak policy."""
    want, got = str(example["answer"]), completion.strip()
    n = max(len(want), len(got))
    if n == 0:
        return 0.0
    return sum(a == b for a, b in zip(reversed(want), reversed(got))) / n
