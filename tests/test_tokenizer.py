"""dsjax.Tokenizer over a small byte-level BPE `tokenizer.json` the test trains itself (no hub): loading,
round trips, DeepSeek special tokens as single ids, the chat encoding as ids, streaming detokenization."""

import json

import pytest

import dsjax

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CORPUS = ["Hello! I am DeepSeek.", "hello world", "1+1=? 2", "The weather in Paris is sunny.",
          "héllo wörld 世界 你好 🙂", "Let me think about it."] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    d = tmp_path_factory.mktemp("tok")
    t.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return dsjax.Tokenizer.from_file(tok_dir / "tokenizer.json")


def test_load_file_or_directory(tok_dir, tok):
    assert tok.bos_id == 0 and tok.eos_id == 1  # DeepSeek's ids for BOS / EOS
    assert dsjax.Tokenizer.from_file(tok_dir).vocab_size == tok.vocab_size > len(SPECIALS)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="No tokenizer at"):
        dsjax.Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        dsjax.Tokenizer.from_file(tmp_path)


def test_tokenizer_config_sets_eos(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</think>"}}))
    t = dsjax.Tokenizer.from_file(tmp_path)
    assert t.eos_id == t.token_to_id("</think>") and t.bos_id == 0


@pytest.mark.parametrize("text", ["hello world", "héllo wörld 世界 🙂", "  spaces\nand\ttabs ", ""])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [0] + ids


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("<｜User｜>hello<｜Assistant｜></think>")
    assert ids[0] == tok.token_to_id("<｜User｜>")
    assert ids[-2:] == [tok.token_to_id("<｜Assistant｜>"), tok.token_to_id("</think>")]
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_chat_encoding_as_ids(tok):
    """The model card example (spec §11) as ids: special tokens at the card's positions, text pieces as
    the plain encoding of the text between them."""
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning": "..."},
                {"role": "user", "content": "1+1=?"}]
    s = tok.token_to_id
    want = ([0, s("<｜User｜>")] + tok.encode("hello") + [s("<｜Assistant｜>"), s("</think>")]
            + tok.encode("Hello! I am DeepSeek.") + [1, s("<｜User｜>")] + tok.encode("1+1=?")
            + [s("<｜Assistant｜>"), s("<think>")])
    assert tok.encode_chat(messages, thinking=True) == want
    completion = tok.encode("Reasoning.</think>Two.<｜end▁of▁sentence｜>")
    assert tok.parse_completion(completion, thinking=True)["content"] == "Two."


def test_chat_needs_deepseek_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(["plain text"], trainers.BpeTrainer(vocab_size=300))
    t.save(str(tmp_path / "tokenizer.json"))
    plain = dsjax.Tokenizer.from_file(tmp_path)
    assert plain.bos_id is None
    with pytest.raises(ValueError, match="lacks the DeepSeek chat special tokens"):
        plain.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no BOS token"):
        plain.encode("x", add_bos=True)


def test_stream_decoder_releases_whole_characters(tok):
    text = "héllo 日本 🚀 ok<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token holds part of a character
    stream = tok.stream()
    pieces = [stream.push([i]) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Without special tokens, as the CLI streams chat answers.
    stream = tok.stream(skip_special_tokens=True)
    assert "".join([stream.push(ids[:3]), stream.push(ids[3:]), stream.flush()]) == "héllo 日本 🚀 ok"
