"""grain data pipeline: sources, chat masks, packing with segment ids, shuffle/shard, iterator state, clear
errors, and packed-row isolation through the model (attention and the DSA top-k never cross documents)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.train import data
from train_util import make_tokenizer, sentences, tmpfile, write_array_record, write_jsonl, write_text_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmpfile(tmp_path_factory.mktemp("tok"), "tokenizer.json"))


def _cfg(paths, **kw):
    kw = {"seq_len": 32, "batch_size": 4, "shard_index": 0, "shard_count": 1, "num_threads": 0, **kw}
    return data.DataConfig(paths=tuple(paths), **kw)


def _docs_from_batches(batches):
    """Reassemble each packed document's token ids (inputs + its last target) from batches."""
    out = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                m = seg == s
                out.append(tuple(b["tokens"][r][m]) + (int(b["targets"][r][m][-1]),))
    return out


def test_chat_mask_targets_and_packing(tok, tmp_path):
    path = write_jsonl(tmpfile(tmp_path, "d.jsonl"), [
        {"text": "alpha beta gamma."},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "delta"},
                      {"role": "assistant", "content": "epsilon zeta"}]},
    ])
    b = next(data.make_iterator(_cfg([path], batch_size=1, num_epochs=1, seq_len=64), tok))
    bos, eos = tok.token_to_id(data.BOS), tok.token_to_id(data.EOS)
    seg, pos, tokens, targets, w = (b[k][0] for k in ("segment_ids", "positions", "tokens", "targets", "weights"))
    assert set(np.unique(seg)) == {0, 1, 2}
    for s in (1, 2):
        m = seg == s
        assert tokens[m][0] == bos and np.array_equal(pos[m], np.arange(m.sum()))
        assert np.array_equal(targets[m][:-1], tokens[m][1:]) and targets[m][-1] == eos  # next token, same doc
    text_seg = 1 if tokens[seg == 1].size == len(tok.encode("alpha beta gamma.").ids) + 1 else 2
    chat = seg == 3 - text_seg
    assert np.all(w[seg == text_seg] == 1) and np.all(w[seg == 0] == 0)
    # Only the assistant reply (and its EOS) is trained; the prompt, markers and system text are not.
    reply = tok.encode("epsilon zeta").ids + [eos]
    assert np.array_equal(targets[chat][w[chat] == 1], reply)
    assert tok.token_to_id(dsjax.chat.USER) in tokens[chat] and tok.token_to_id(dsjax.chat.THINK_END) in tokens[chat]


def test_chat_segments_thinking_and_tools():
    """Thinking mode: the last user turn opens <think>, the reply after it is trained with its reasoning;
    tool results are context. Rendering is dsjax.chat's (the inference encoder), so train and serve agree."""
    from dsjax import chat

    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "old"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "", "reasoning_content": "r2",
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "out"}, {"role": "assistant", "content": "a2", "reasoning_content": "r3"}]
    segs = data.chat_segments(msgs, thinking=True)
    assert "".join(t for t, _ in segs) == chat.encode_messages(msgs, thinking=True, add_bos=False)
    assert [trained for _, trained in segs] == [False, True, False, True, False, True]
    assert segs[1][0] == "a1" + chat.EOS  # reasoning of an earlier episode is dropped
    assert segs[2][0].endswith(chat.THINK_START) and segs[3][0].startswith("r2" + chat.THINK_END)
    assert segs[5][0] == "r3" + chat.THINK_END + "a2" + chat.EOS
    with pytest.raises(data.DataError, match="unknown role"):
        data.chat_segments([{"role": "narrator", "content": "x"}])


def test_sources_agree_and_shuffle_shard(tok, tmp_path):
    texts = sentences(40, seed=5)
    jl = write_jsonl(tmpfile(tmp_path, "d.jsonl"), [{"text": t} for t in texts])
    tx = tmpfile(tmp_path, "d.txt")
    open(tx, "w").write("\n\n".join(texts))
    ar = write_array_record(tmpfile(tmp_path, "d.array_record"),
                            [json.dumps({"text": t}).encode() if i % 2 else t.encode() for i, t in enumerate(texts)])
    runs = {}
    for name, p in (("jsonl", jl), ("text", tx), ("arrayrecord", ar)):
        it = data.make_iterator(_cfg([p], num_epochs=1, seed=3), tok)
        runs[name] = _docs_from_batches(list(it))
    assert runs["jsonl"] == runs["text"] == runs["arrayrecord"]
    expected = {tuple([0] + tok.encode(t).ids + [1]) for t in texts}
    every = set(runs["jsonl"])
    assert len(runs["jsonl"]) >= 32 and every <= expected  # drop_remainder may drop the last rows
    other_seed = _docs_from_batches(list(data.make_iterator(_cfg([jl], num_epochs=1, seed=4), tok)))
    assert other_seed != runs["jsonl"]
    shards = [set(_docs_from_batches(list(data.make_iterator(
        _cfg([jl], num_epochs=1, shard_index=i, shard_count=2, batch_size=2, seq_len=64), tok)))) for i in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0]) > 10 and len(shards[1]) > 10


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_iterator_state_resumes_exactly(tok, tmp_path, packing):
    path = write_text_corpus(tmpfile(tmp_path, "c.txt"), 60)
    cfg = _cfg([path], packing=packing, seed=1)
    it = data.make_iterator(cfg, tok)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    want = [next(it) for _ in range(4)]
    it2 = data.make_iterator(cfg, tok)
    it2.set_state(state)
    got = [next(it2) for _ in range(4)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_clear_errors(tok, tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.make_iterator(_cfg([tmpfile(tmp_path, "missing.jsonl")]), tok)
    empty = tmpfile(tmp_path, "empty.txt")
    open(empty, "w").write("\n\n  \n")
    with pytest.raises(data.DataError, match="no documents"):
        data.make_iterator(_cfg([empty]), tok)
    bad = tmpfile(tmp_path, "bad.jsonl")
    open(bad, "w").write('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(data.DataError, match="line 2: not valid JSON"):
        data.make_iterator(_cfg([bad]), tok)
    wrong = write_jsonl(tmpfile(tmp_path, "wrong.jsonl"), [{"prompt": "x"}])
    with pytest.raises(data.DataError, match=r'expected \{"text"'):
        data.make_iterator(_cfg([wrong]), tok)
    blank = write_jsonl(tmpfile(tmp_path, "blank.jsonl"), [{"text": ""}] * 3)
    no_specials = data.DataConfig(paths=(blank,), seq_len=8, batch_size=1, add_bos=False, add_eos=False,
                                  shard_index=0, shard_count=1)
    with pytest.raises(data.DataError, match="effectively empty"):
        data.make_iterator(no_specials, tok)
    small = write_jsonl(tmpfile(tmp_path, "small.jsonl"), [{"text": "alpha"}])
    it = data.make_iterator(_cfg([small], num_epochs=1, batch_size=4), tok)
    with pytest.raises(data.DataError, match="ran out of data"):
        data.next_batch(it, _cfg([small], num_epochs=1, batch_size=4))
    with pytest.raises(data.DataError, match="vocab_size is 100"):
        data.make_iterator(_cfg([small]), tok, vocab_size=100)
    with pytest.raises(data.DataError, match="packing"):
        _cfg([small], packing="best")
    with pytest.raises(data.DataError, match="tokenizer file"):
        data.load_tokenizer(tmpfile(tmp_path, "nope.json"))


def test_packed_rows_are_isolated_through_the_model(tok, tmp_path):
    """Logits of documents packed into one row equal the logits of each document alone. The row (40 tokens)
    is longer than index_topk (8), so the DSA indexer prunes: its top-k must stay inside each document."""
    cfg = dsjax.Config.preset("tiny", index_topk=8)
    params = dsjax.init_params(cfg, jax.random.key(0))
    texts = [" ".join(sentences(2, seed=16)), " ".join(sentences(1, seed=10))]  # 25 + 18 tokens
    path = write_jsonl(tmpfile(tmp_path, "two.jsonl"), [{"text": t} for t in texts])
    length = 48
    it = data.make_iterator(_cfg([path], seq_len=length, batch_size=1, num_epochs=1), tok)
    b = next(it)
    seg = b["segment_ids"][0]
    assert set(np.unique(seg[seg > 0])) == {1, 2} and (seg == 1).sum() > 8 and (seg == 2).sum() > 8
    # Rows 1-2: each document alone at the start of a row (the padding after it cannot influence it).
    rows = [b["tokens"][0]]
    for s in (1, 2):
        alone = np.zeros(length, np.int32)
        alone[:(seg == s).sum()] = b["tokens"][0][seg == s]
        rows.append(alone)
    tokens = jnp.asarray(np.stack(rows))
    positions = jnp.asarray(np.stack([b["positions"][0], np.arange(length), np.arange(length)]), jnp.int32)
    segs = jnp.asarray(np.stack([seg, np.ones(length), np.ones(length)]), jnp.int32)
    logits = jax.jit(lambda p, t, q, s: dsjax.forward_with_aux(p, t, cfg, positions=q, segment_ids=s)[0])(
        params, tokens, positions, segs)
    scale = float(jnp.abs(logits).max())
    for s, row in ((1, 1), (2, 2)):
        n = int((seg == s).sum())
        np.testing.assert_allclose(logits[0][seg == s], logits[row][:n], atol=2e-5 * scale)
    # Control: without segment ids the second document attends to the first, and its logits change.
    mixed = jax.jit(lambda p, t, q: dsjax.forward_with_aux(p, t, cfg, positions=q)[0])(
        params, tokens[:1], positions[:1])
    assert float(jnp.abs(mixed[0][seg == 2] - logits[0][seg == 2]).max()) > 1e-3 * scale


def test_non_utf8_text_is_replaced_with_a_warning(tok, tmp_path, caplog):
    """Stray Latin-1 bytes in a text corpus and a JSONL file: the documents still load, the bad bytes become
    U+FFFD, and one warning per file names it and the count (before: replaced silently)."""
    txt = tmpfile(tmp_path, "latin1.txt")
    open(txt, "wb").write("alpha beta caf\u00e9 gamma\n\ndelta na\u00efve".encode("latin-1"))
    jl = tmpfile(tmp_path, "latin1.jsonl")
    open(jl, "wb").write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with caplog.at_level("WARNING"):
        docs = data._read_text(txt, "\n\n") + data.read_jsonl(jl)
    assert [d["text"] for d in docs] == ["alpha beta caf\ufffd gamma", "delta na\ufffdve", "ok", "caf\ufffd"]
    warned = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
    assert len(warned) == 2 and txt in warned[0] and "2 invalid UTF-8" in warned[0] and jl in warned[1], warned
    clean = write_text_corpus(tmpfile(tmp_path, "clean.txt"), 3)
    caplog.clear()
    with caplog.at_level("WARNING"):
        data._read_text(clean, "\n\n")
    assert not [r for r in caplog.records if "invalid UTF-8" in r.getMessage()]
