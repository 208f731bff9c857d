"""Tokenizer: a thin wrapper of the `tokenizers` library for DeepSeek's `tokenizer.json`, plus the V3.2
chat encoding (`dsjax.chat`) and streaming detokenization.

    tok = dsjax.Tokenizer.from_file("path/to/tokenizer.json")      # or the checkpoint directory
    ids = tok.encode_chat([{"role": "user", "content": "1+1=?"}], thinking=True)
    out = dsjax.generate(params, config, [ids], max_new_tokens=256, stop_tokens=[tok.eos_id])
    print(tok.decode(out[0]))

Special-token strings in the text (`<｜User｜>`, `<｜end▁of▁sentence｜>`, ...) map to their single ids, as in
the official encoder; `encode` never adds BOS on its own (the chat encoding writes it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from dsjax import chat


class Tokenizer:
    """DeepSeek V3/V3.2 byte-level BPE (any HF `tokenizer.json`)."""

    def __init__(self, tokenizer: Any, *, bos_token: str = chat.BOS, eos_token: str = chat.EOS):
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id: int | None = tokenizer.token_to_id(bos_token)
        self.eos_id: int | None = tokenizer.token_to_id(eos_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (the file, or a directory holding it). BOS/EOS come from a neighbouring
        `tokenizer_config.json` when present, else DeepSeek's `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>`."""
        from tokenizers import Tokenizer as HFTokenizer

        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "tokenizer.json")
        if not os.path.isfile(p):
            raise ValueError(f"No tokenizer at {p!r}: pass tokenizer.json or the directory that holds it.")
        try:
            tok = HFTokenizer.from_file(p)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{p} is not a valid tokenizers JSON file ({e}).") from None
        special = {"bos_token": chat.BOS, "eos_token": chat.EOS}
        cfg_path = os.path.join(os.path.dirname(p), "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            for key in special:
                v = cfg.get(key)
                v = v.get("content") if isinstance(v, Mapping) else v
                if isinstance(v, str):
                    special[key] = v
        return cls(tok, **special)

    # ------------------------------------------------------------------ ids <-> text
    @property
    def vocab_size(self) -> int:
        """Number of token ids (with added special tokens); the model's embedding may have more rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings become their ids). add_bos: prepend BOS."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects text (str), got {type(text).__name__}.")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but the tokenizer has no BOS token {self.bos_token!r}.")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, thinking: bool = False,
                    context: Sequence[Mapping[str, Any]] = (), add_bos: bool = True) -> list[int]:
        """Token ids of a conversation in the DeepSeek V3.2 chat format (`dsjax.chat.encode_messages`),
        ending with the generation prompt when the last turn is a user turn."""
        missing = [t for t in chat.SPECIAL_TOKENS if self.token_to_id(t) is None]
        if missing:
            raise ValueError(f"this tokenizer lacks the DeepSeek chat special tokens {missing}; it cannot "
                             "encode V3.2 chats.")
        return self.encode(chat.encode_messages(messages, thinking=thinking, context=context, add_bos=add_bos))

    def parse_completion(self, ids: Sequence[int], *, thinking: bool = False) -> dict[str, Any]:
        """The assistant message (content, reasoning, tool calls) of generated ids."""
        return chat.parse_completion(self.decode(ids), thinking=thinking)

    def stream(self, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder for streaming generated ids to text."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns ids arriving a few at a time into text pieces whose concatenation is `decode(all ids)`.

    Byte-level BPE can split one character over several tokens, so text is released only once it no
    longer ends in an incomplete UTF-8 sequence (U+FFFD); a small window of earlier ids is decoded with the
    new ones so decoders that strip leading spaces still see the context.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read] were decoded and released already

    def push(self, ids: Sequence[int]) -> str:
        """Add new ids; return the newly complete text (possibly empty)."""
        self._ids.extend(int(i) for i in ids)
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes as U+FFFD)."""
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
