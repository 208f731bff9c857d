"""`dsjax.generate`: greedy parity with HF transformers (full forward recomputed at every step), cached
decode equal to the full forward past index_topk, mixed-length batches, chunked prefill, stop tokens,
streaming, reproducible sampling, MTP speculation, and clear errors for bad input.

All cases share the tiny HF models of conftest.py and one batch shape, so each decode variant compiles
once per session. Prompts are longer than index_topk = 16 and the cache (64 slots) is too, so every
decode step runs the indexer's top-k and the sparse MLA op.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import dsjax
import hf_reference as H
from dsjax import model as model_lib
from dsjax import mtp as mtp_lib
from dsjax import params as params_lib
from dsjax import cache as cache_lib
from dsjax.generate import generate_with_stats

N_NEW = 32
PROMPT_LENS = (25, 27, 9)  # two past index_topk, one below it (it crosses index_topk while decoding)
TOL = 1e-4  # max |Δlogits| <= TOL * max|logits|, as in test_parity_hf.py


def _prompts(vocab, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]


def _random_tree(specs, cfg, rng, scale=None):
    """Random params for a spec subtree (numpy: much faster than per-leaf jax.random in tests)."""
    def make(s):
        dt = params_lib.param_dtype(s, cfg)
        if s.init in ("ones", "zeros"):
            return (jnp.ones if s.init == "ones" else jnp.zeros)(s.shape, dt)
        return jnp.asarray(rng.normal(0.0, scale or cfg.initializer_range, s.shape), dt)

    return jax.tree.map(make, specs, is_leaf=lambda x: isinstance(x, params_lib.ParamSpec))


@pytest.fixture(scope="module")
def v32(hf_v32):
    """(HF model, config with an MTP module, params = HF weights + a random MTP module)."""
    model, path = hf_v32
    cfg, params = checkpoints.load_hf(path)
    cfg = cfg.replace(num_nextn_predict_layers=1)  # HF never saves MTP; add a random one for speculation
    mtp = _random_tree(params_lib.param_specs(cfg)["mtp"], cfg, np.random.default_rng(11))
    return model, cfg, {**params, "mtp": mtp}


@pytest.fixture(scope="module")
def v32_greedy(v32):
    _, cfg, params = v32
    return generate_with_stats(params, cfg, _prompts(cfg.vocab_size), max_new_tokens=N_NEW,
                                   return_logits=True)


def _hf_greedy(model, prompt, n):
    """HF greedy decoding that recomputes the full forward at every step (no KV cache)."""
    seq, logits = list(prompt), []
    for _ in range(n):
        lg = H.hf_logits(model, np.array([seq]))[0, -1]
        logits.append(lg)
        seq.append(int(lg.argmax()))
    return seq[len(prompt):], np.stack(logits)


def _check_parity(model, cfg, prompts, res):
    if cfg.has_indexer:
        assert res.stats["cache_len"] > cfg.index_topk  # decode-time DSA is active
    for i, p in enumerate(prompts):
        ref_tokens, ref_logits = _hf_greedy(model, p, N_NEW)
        assert res.tokens[i] == ref_tokens, (i, res.tokens[i], ref_tokens)
        gap = np.abs(res.logits[i] - ref_logits).max(axis=-1)  # per decode step
        assert gap.max() <= TOL * np.abs(ref_logits).max(), (i, gap)


def test_greedy_matches_hf_v32(v32, v32_greedy):
    """32 greedy tokens equal HF's; every step's logits match HF's full forward on the same prefix, so
    the cached sparse decode does not drift once the context exceeds index_topk (up to 59 > 16 keys)."""
    model, cfg, _ = v32
    prompts = _prompts(cfg.vocab_size)
    assert max(PROMPT_LENS) + N_NEW > 3 * cfg.index_topk and min(PROMPT_LENS) < cfg.index_topk
    _check_parity(model, cfg, prompts, v32_greedy)


def test_greedy_matches_hf_v3(hf_v3):
    model, path = hf_v3
    cfg, params = checkpoints.load_hf(path)
    prompts = _prompts(cfg.vocab_size, seed=6)
    _check_parity(model, cfg, prompts, generate_with_stats(params, cfg, prompts, max_new_tokens=N_NEW,
                                                               return_logits=True))


def test_decode_logits_equal_full_forward(v32, v32_greedy):
    """The logits of every decode step equal dsjax's own full forward over prompt + generated tokens."""
    _, cfg, params = v32
    seqs = [p + toks[:-1] for p, toks in zip(_prompts(cfg.vocab_size), v32_greedy.tokens)]
    width = max(map(len, seqs))
    batch = np.array([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal, so harmless
    full = np.asarray(dsjax.forward(params, batch, cfg))
    for i, (p, s, lg) in enumerate(zip(_prompts(cfg.vocab_size), seqs, v32_greedy.logits)):
        ref = full[i, len(p) - 1:len(s)]
        np.testing.assert_allclose(lg, ref, atol=2e-5 * np.abs(ref).max())


def test_mixed_lengths_equal_each_prompt_alone(v32, v32_greedy):
    _, cfg, params = v32
    for i, p in enumerate(_prompts(cfg.vocab_size)[:2]):  # one prompt bucket (28): one compile for B = 1
        alone = generate_with_stats(params, cfg, [p], max_new_tokens=N_NEW, return_logits=True)
        assert alone.tokens[0] == v32_greedy.tokens[i]
        np.testing.assert_allclose(alone.logits[0], v32_greedy.logits[i], atol=2e-5)


def test_one_compile_serves_every_step_and_call(v32, v32_greedy):
    """A call with prompts of other lengths in the same buckets compiles nothing: the prefill, the first
    token and the decode step (whose state keeps its shapes from step to step) are all reused."""
    from dsjax.generate import _prefill_chunk, _start, _step

    _, cfg, params = v32
    sizes = [f._cache_size() for f in (_prefill_chunk, _start, _step)]
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (26, 28, 12)]  # buckets 28 and 64 again
    res = generate_with_stats(params, cfg, prompts, max_new_tokens=N_NEW, return_logits=True)
    assert res.stats["steps"] == N_NEW - 1 and [len(t) for t in res.tokens] == [N_NEW] * 3
    assert [f._cache_size() for f in (_prefill_chunk, _start, _step)] == sizes


def test_chunked_prefill_equals_one_shot(v32, v32_greedy):
    _, cfg, params = v32
    res = generate_with_stats(params, cfg, _prompts(cfg.vocab_size), max_new_tokens=N_NEW, prefill_chunk=8,
                                  return_logits=True)
    assert res.stats["prefill_chunk"] == 8
    assert res.tokens == v32_greedy.tokens
    for a, b in zip(res.logits, v32_greedy.logits):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_stop_tokens_per_prompt_max_and_streaming(v32, v32_greedy):
    _, cfg, params = v32
    ref = v32_greedy.tokens
    stop = ref[0][4]  # the 5th greedy token of prompt 0
    max_new = [N_NEW, 7, 3]
    streamed = [[] for _ in ref]

    def callback(new):
        assert len(new) == len(ref)
        for s, t in zip(streamed, new):
            s.extend(t)

    out = generate_with_stats(params, cfg, _prompts(cfg.vocab_size), max_new_tokens=max_new, stop_tokens=[stop],
                              callback=callback, return_logits=True).tokens
    for r, o, m in zip(ref, out, max_new):
        want = r[:m]
        if stop in want:
            want = want[:want.index(stop) + 1]  # the stop token ends the sequence and is kept
        assert o == want
    assert out[0][-1] == stop and len(out[0]) <= 5
    assert streamed == out
    # Per-prompt stop lists: only prompt 1 stops at its own 2nd token.
    out = generate_with_stats(params, cfg, _prompts(cfg.vocab_size), max_new_tokens=N_NEW,
                              stop_tokens=[[], [ref[1][1]], []], return_logits=True).tokens
    assert out[1] == ref[1][:ref[1].index(ref[1][1]) + 1] and out[0] == ref[0] and out[2] == ref[2]


def test_sampling_is_reproducible(v32, v32_greedy):
    _, cfg, params = v32
    prompts = _prompts(cfg.vocab_size)
    kw = dict(max_new_tokens=N_NEW, temperature=0.8, top_p=0.9, top_k=50)
    a = dsjax.generate(params, cfg, prompts, seed=3, **kw)
    assert a == dsjax.generate(params, cfg, prompts, seed=3, **kw)
    assert a != dsjax.generate(params, cfg, prompts, seed=4, **kw)
    assert a != v32_greedy.tokens
    # top_k = 1 leaves one candidate: sampling must reproduce greedy decoding.
    assert dsjax.generate(params, cfg, prompts, seed=3, **{**kw, "top_k": 1}) == v32_greedy.tokens


def _bench_module():
    """experiments/bench_generate.py, which holds the agreeing-MTP construction the benchmark also uses."""
    spec = importlib.util.spec_from_file_location(
        "bench_generate", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "experiments", "bench_generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mtp_speculation_equals_plain_decoding(v32, v32_greedy):
    _, cfg, params = v32
    prompts = _prompts(cfg.vocab_size)
    # Random MTP weights: drafts are almost never right, the output must not change.
    spec = generate_with_stats(params, cfg, prompts, max_new_tokens=N_NEW, mtp=True)
    assert spec.tokens == v32_greedy.tokens
    assert spec.stats["drafted"] > 0 and spec.stats["acceptance_rate"] < 0.2
    # An MTP that agrees often: both the accept and the reject paths run, in fewer steps.
    agree = _bench_module().agreeing_mtp(params, cfg, 0.05)
    plain = generate_with_stats(agree, cfg, prompts, max_new_tokens=N_NEW, return_logits=True)
    spec = generate_with_stats(agree, cfg, prompts, max_new_tokens=N_NEW, mtp=True)
    assert spec.tokens == plain.tokens
    assert 0 < spec.stats["accepted"] < spec.stats["drafted"]
    assert spec.stats["steps"] < plain.stats["steps"]
    # Sampling draws each token with its own key, so speculation samples the very same tokens.
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, seed=7)
    assert dsjax.generate(agree, cfg, prompts, mtp=True, **kw) == dsjax.generate(agree, cfg, prompts, **kw)
    # With stop tokens and per-prompt limits the accepted second token must respect them too.
    stop = plain.tokens[0][5]
    kw = dict(max_new_tokens=[N_NEW, 6, 11], stop_tokens=[stop])
    assert (dsjax.generate(agree, cfg, prompts, mtp=True, **kw)
            == generate_with_stats(agree, cfg, prompts, return_logits=True, **kw).tokens)


def test_mtp_cache_matches_uncached_mtp(v32):
    """The MTP block with a cache, fed 2 tokens per step as speculation runs it, gives the logits of the
    uncached MTP over the whole sequence (past index_topk, so its indexer prunes)."""
    _, cfg, params = v32
    b, length, cap = 2, 41, 64  # 40 MTP rows, fed 2 at a time as speculation does
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, length)))
    hidden = jnp.asarray(rng.normal(0, 1, (b, length, cfg.hidden_size)), jnp.float32)  # any main hidden
    full = jax.jit(lambda h, t: mtp_lib.mtp_logits(params, h, t, cfg))(hidden, tokens)[:, :length - 1]
    nxt, h = tokens[:, 1:], hidden[:, :length - 1]
    pos = jnp.broadcast_to(jnp.arange(length - 1), (b, length - 1))
    mc = cache_lib.init_cache(cfg, b, cap, mtp=True)["mtp"]
    step = jax.jit(lambda h, t, p, c: mtp_lib.mtp_forward(params, h, t, cfg, positions=p, cache=c))
    outs = []
    for t in range(0, length - 1, 2):
        out, mc = step(h[:, t:t + 2], nxt[:, t:t + 2], pos[:, t:t + 2], mc)
        outs.append(out)
    cached = model_lib.lm_head(params, jnp.concatenate(outs, 1))
    np.testing.assert_allclose(cached, full, atol=2e-5 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("prompts,kw,needle", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 256, 3]], {}, "token id 256, outside the vocabulary"),
    ([[1, -1]], {}, "token id -1, outside the vocabulary"),
    ([[1, 2]], {"max_new_tokens": 511}, "exceeds max_position_embeddings=512"),
    ([[1, 2]], {"max_new_tokens": 20, "max_len": 16}, "exceeds max_len=16"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens=0"),
    ([[1, 2], [3]], {"max_new_tokens": [3]}, "1 values for 2 prompts"),
    (["hello"], {}, "prompt 0 is text"),
    ([], {}, "non-empty list"),
    ([[1.5, 2.0]], {}, "integer token ids"),
    ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_k": -2}, "top_k"),
    ([[1, 2]], {"stop_tokens": [999]}, "stop token 999"),
    ([[1, 2]], {"parallel": object()}, "parallel must be a dsjax.parallel.Parallelism"),
])
def test_bad_input_raises_clear_error(v32, prompts, kw, needle):
    _, cfg, params = v32
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises((ValueError, NotImplementedError), match=needle):
        dsjax.generate(params, cfg, prompts, **kw)


def test_mtp_without_weights_raises(hf_v3):
    _, path = hf_v3
    cfg, params = checkpoints.load_hf(path)
    with pytest.raises(ValueError, match="MTP module"):
        dsjax.generate(params, cfg, [[1, 2]], max_new_tokens=3, mtp=True)
