"""Batched generation over the MLA latent cache: chunked prefill, one compiled decode step, sampling,
stop tokens, streaming, and MTP speculative decoding.

    prompts (mixed lengths) -> right-pad into a bucket -> prefill in chunks (fills the cache)
        -> first token from the last prompt position -> decode steps (one jitted function, reused)

Decode runs the model on T = 1 new token per sequence (T = 2 with MTP speculation) at that sequence's own
position: attention is the absorbed MLA form over the latent cache (`attention.mla` with a cache), and for
V3.2 with a cache longer than `index_topk` every step selects its keys with the lightning indexer and calls
`pallas_kernels.sparse_mla`. Shapes are static: a prompt bucket (up to the prefill chunk; longer prompts
take several chunks) and a cache bucket, so one compile serves every step and every batch of the same size.

MTP speculation (`mtp=True`): the MTP module drafts token p+1 while the model verifies it in the same
forward pass (tokens [x_p, draft] at positions [p, p+1]). The model's token y1 at p is always kept; if it
equals the draft, the model's token y2 at p+1 (computed from the draft) is kept too. Each emitted token is
drawn from exactly the distribution plain decoding draws it from, with the same per-token random key
(`sampling.token_keys`), so the output equals plain decoding, greedy or sampled, up to float rounding.
"""

from __future__ import annotations

import functools
import numbers
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import cache as cache_lib
from dsjax import model, parallel as parallel_lib, sampling
from dsjax.config import Config
from dsjax.mtp import mtp_forward
from dsjax.parallel import Parallelism

Params = Any
Callback = Callable[[list[list[int]]], None]

MIN_BUCKET = 16  # smallest prompt bucket (see `bucket`)
MIN_CACHE = 64  # smallest cache bucket


class GenerationResult(NamedTuple):
    """What `generate_with_stats` returns."""

    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last element)
    logits: list[np.ndarray] | None  # per prompt f32 [n_new, V]: the logits each new token was drawn from
    stats: dict[str, float]  # timings (s), token counts, steps, MTP drafts / accepted / acceptance_rate
    # record=True: per prompt {"logprobs": f32 [n_new] (log-prob of each new token under the distribution it
    # was drawn from: tempered, truncated), "masks": uint32 [n_new, ceil(V/32)] (that kept vocabulary,
    # `sampling.pack_mask`), "selection": {"dense"/"moe": int32 [P + n_new - 1, n, K] DSA keys, "moe_experts":
    # [P + n_new - 1, n, k] MoE routing} for every token fed to the model (the prompt's P, then each new
    # token but the last): what a training forward over prompt + completion replays (`batch["selection"]`)}
    record: list[dict[str, Any]] | None = None


class _State(NamedTuple):
    cache: dict[str, Any]  # cache["lengths"] [B] is also the position of `tokens`, the next slot to write
    tokens: jax.Array  # int32 [B]: the newest token, not yet in the cache
    draft: jax.Array  # int32 [B]: MTP draft for the slot after `tokens` (unused without MTP)
    count: jax.Array  # int32 [B]: tokens emitted so far
    done: jax.Array  # bool [B]


class _Consts(NamedTuple):
    key: jax.Array  # PRNG key from the seed
    seq: jax.Array  # int32 [B] sequence index (for per-sequence keys)
    max_new: jax.Array  # int32 [B]
    stop: jax.Array  # int32 [B, n_stop], -1 = unused
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array


class _Out(NamedTuple):
    tokens: jax.Array  # int32 [B, 2]: up to two new tokens per sequence
    n_new: jax.Array  # int32 [B]: how many of them are real (0, 1 or 2)
    drafted: jax.Array  # bool [B]: an MTP draft was verified this step
    accepted: jax.Array  # bool [B]: ... and the model agreed with it
    done: jax.Array  # bool [B]
    logits: jax.Array | None  # f32 [B, T, V] (with_logits only)
    record: dict[str, Any] | None = None  # record only: "logprob" f32 [B], "mask" uint32 [B, W], "selection"


# ----------------------------------------------------------------------------- jitted pieces
def _sample(logits, consts: _Consts, count, greedy: bool):
    keys = sampling.token_keys(consts.key, consts.seq, count)
    return sampling.sample(logits, keys, greedy=greedy, temperature=consts.temperature, top_p=consts.top_p,
                           top_k=consts.top_k)


def _sample_recorded(logits, consts: _Consts, count) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`_sample` (sampling, not greedy) plus what the sampler did: log π_old of each token drawn and the
    kept vocabulary, from the one truncation the draw used."""
    drawn = sampling.sampling_logits(logits, temperature=consts.temperature, top_p=consts.top_p,
                                     top_k=consts.top_k)
    y = sampling.draw(drawn, sampling.token_keys(consts.key, consts.seq, count))
    logp = jnp.take_along_axis(jax.nn.log_softmax(drawn, axis=-1), y[:, None], axis=-1)[:, 0]
    return y, {"logprob": logp, "mask": sampling.pack_mask(drawn > -jnp.inf)}


def _is_stop(tok, stop):
    return jnp.any(tok[:, None] == stop, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "use_mtp", "parallel", "record"), donate_argnames=("cache",))
def _prefill_chunk(params, cache, tokens, positions, next_tokens, mtp_positions, last_rel, last_hidden, *,
                   config: Config, use_mtp: bool, parallel: Parallelism | None = None, record: bool = False):
    """One prefill chunk: tokens/positions [B, C] (position -1 = padding). Writes the chunk's latents and
    keeps the hidden state of each sequence's last prompt token (`last_rel` = its index in this chunk).
    -> (cache, last hidden, the chunk's DSA keys and routing [B, C, ...] when `record`)."""
    aux = model.forward_hidden(params, tokens, config, positions=positions, cache=cache_lib.layer_caches(cache),
                               record_selection=record, parallel=parallel)
    new = {**cache, **aux.cache}
    if use_mtp:
        # Position i of the MTP block reads t_{i+1}; for the last prompt token that is the first new token,
        # unknown yet, so `mtp_positions` drops it here and `_start` writes it.
        _, new["mtp"] = mtp_forward(params, aux.hidden, next_tokens, config, positions=mtp_positions,
                                    cache=cache["mtp"], parallel=parallel)
    c = tokens.shape[1]
    inside = (last_rel >= 0) & (last_rel < c)
    h = jnp.take_along_axis(aux.hidden, jnp.clip(last_rel, 0, c - 1)[:, None, None], axis=1)[:, 0]
    new["lengths"] = jnp.maximum(cache["lengths"], jnp.max(positions, axis=1) + 1)
    return new, jnp.where(inside[:, None], h, last_hidden), aux.selection


@functools.partial(jax.jit, static_argnames=("config", "greedy", "use_mtp", "with_logits", "parallel", "record"),
                   donate_argnames=("cache",))
def _start(params, cache, last_hidden, consts: _Consts, *, config: Config, greedy: bool, use_mtp: bool,
           with_logits: bool, parallel: Parallelism | None = None, record: bool = False):
    """First new token from the last prompt position (and the first MTP draft)."""
    lengths = cache["lengths"]  # prompt lengths
    logits = model.lm_head(params, last_hidden)
    rec = None
    if record:
        y, rec = _sample_recorded(logits, consts, jnp.zeros_like(lengths))
    else:
        y = _sample(logits, consts, jnp.zeros_like(lengths), greedy)
    count = jnp.ones_like(lengths)
    done = _is_stop(y, consts.stop) | (count >= consts.max_new)
    draft = jnp.zeros_like(y)
    if use_mtp:
        out, mc = mtp_forward(params, last_hidden[:, None], y[:, None], config, positions=(lengths - 1)[:, None],
                              cache=cache["mtp"], parallel=parallel)
        cache = {**cache, "mtp": mc}
        draft = jnp.argmax(model.lm_head(params, out[:, 0]), axis=-1).astype(jnp.int32)
    state = _State(cache, y, draft, count, done)
    no = jnp.zeros_like(done)
    return state, _Out(jnp.stack([y, y], 1), count, no, no, done, logits[:, None] if with_logits else None, rec)


@functools.partial(jax.jit, static_argnames=("config", "greedy", "with_logits", "parallel", "record"),
                   donate_argnames=("state",))
def _step(params, state: _State, consts: _Consts, *, config: Config, greedy: bool, with_logits: bool,
          parallel: Parallelism | None = None, record: bool = False):
    """One plain decode step: every active sequence feeds its newest token and draws the next one."""
    active = ~state.done
    aux = model.forward_hidden(params, state.tokens[:, None], config, positions=state.cache["lengths"][:, None],
                               cache=cache_lib.layer_caches(state.cache), record_selection=record,
                               parallel=parallel)
    logits = model.lm_head(params, aux.hidden[:, 0])
    rec = None
    if record:
        y, rec = _sample_recorded(logits, consts, state.count)
        rec["selection"] = aux.selection
    else:
        y = _sample(logits, consts, state.count, greedy)
    n_new = active.astype(jnp.int32)
    count = state.count + n_new
    done = state.done | (active & (_is_stop(y, consts.stop) | (count >= consts.max_new)))
    cache = {**state.cache, **aux.cache, "lengths": state.cache["lengths"] + n_new}
    new = _State(cache, jnp.where(active, y, state.tokens), state.draft, count, done)
    no = jnp.zeros_like(done)
    return new, _Out(jnp.stack([y, y], 1), n_new, no, no, done, logits[:, None] if with_logits else None, rec)


@functools.partial(jax.jit, static_argnames=("config", "greedy", "with_logits", "parallel"),
                   donate_argnames=("state",))
def _spec_step(params, state: _State, consts: _Consts, *, config: Config, greedy: bool, with_logits: bool,
               parallel: Parallelism | None = None):
    """One speculative step: verify the MTP draft (2 tokens through the model), draft the next one."""
    active = ~state.done
    toks = jnp.stack([state.tokens, state.draft], 1)
    p = state.cache["lengths"]
    pos = jnp.stack([p, p + 1], 1)
    aux = model.forward_hidden(params, toks, config, positions=pos, cache=cache_lib.layer_caches(state.cache),
                               parallel=parallel)
    logits = model.lm_head(params, aux.hidden)  # [B, 2, V]
    y1 = _sample(logits[:, 0], consts, state.count, greedy)
    y2 = _sample(logits[:, 1], consts, state.count + 1, greedy)  # valid only if the draft was right
    accepted = active & (y1 == state.draft)
    c1 = state.count + 1
    first_ends = _is_stop(y1, consts.stop) | (c1 >= consts.max_new)
    take2 = accepted & ~first_ends
    second_ends = _is_stop(y2, consts.stop) | (c1 + 1 >= consts.max_new)
    n_new = active.astype(jnp.int32) * (1 + take2.astype(jnp.int32))
    done = state.done | (active & (first_ends | (take2 & second_ends)))
    # MTP at [p, p+1] with next tokens [y1, y2]: row p is always right (h_p and y1 are final); row p+1 is
    # right only if the draft was accepted, else it is rewritten next step. The new draft comes from the
    # newest row whose inputs are right.
    out, mc = mtp_forward(params, aux.hidden, jnp.stack([y1, y2], 1), config, positions=pos,
                          cache=state.cache["mtp"], parallel=parallel)
    row = jnp.take_along_axis(out, take2.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    draft = jnp.argmax(model.lm_head(params, row), axis=-1).astype(jnp.int32)
    cache = {**state.cache, **aux.cache, "mtp": mc, "lengths": p + n_new}
    newest = jnp.where(take2, y2, y1)
    new = _State(cache, jnp.where(active, newest, state.tokens), jnp.where(active, draft, state.draft),
                 state.count + n_new, done)
    return new, _Out(jnp.stack([y1, y2], 1), n_new, active, accepted, done, logits if with_logits else None)


# ----------------------------------------------------------------------------- host side
def bucket(n: int, lo: int = 1) -> int:
    """Static-shape bucket for n >= 1: at least `lo`, else n rounded up to a multiple of a quarter of the
    power of two below it (4 buckets per octave: at most 25% padding, few distinct shapes to compile)."""
    if n <= lo:
        return lo
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // 4)
    return -(-n // step) * step


def cache_length(needed: int, config: Config) -> int:
    """Cache slots for `needed` tokens: `bucket(needed)` (at least 64), capped at the model's limit."""
    return min(bucket(needed, MIN_CACHE), config.max_position_embeddings)


def _per_prompt(value: Any, n: int, what: str) -> list:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)] * n
    vals = list(value)
    if len(vals) != n:
        raise ValueError(f"{what}: got {len(vals)} values for {n} prompts; pass one int or one per prompt.")
    return vals


def _check_prompts(prompts: Any, config: Config) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists (tokenize text with "
                         "dsjax.Tokenizer first).")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"prompt {i} is text; pass token ids (dsjax.Tokenizer.encode).")
        a = np.asarray(p)
        if a.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {a.shape}.")
        if a.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS).")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {a.dtype}.")
        if a.min() < 0 or a.max() >= config.vocab_size:
            bad = int(a.max()) if a.max() >= config.vocab_size else int(a.min())
            raise ValueError(f"prompt {i} contains token id {bad}, outside the vocabulary [0, {config.vocab_size}); "
                             "check that the tokenizer matches the model.")
        out.append(a.astype(np.int32))
    return out


def _stop_array(stop_tokens: Any, n: int, vocab: int) -> np.ndarray:
    stop_tokens = list(stop_tokens or ())
    if stop_tokens and all(isinstance(s, (int, np.integer)) for s in stop_tokens):
        rows = [stop_tokens] * n
    elif all(not isinstance(s, (int, np.integer)) for s in stop_tokens):
        rows = _per_prompt(stop_tokens, n, "stop_tokens") if stop_tokens else [[]] * n
        rows = [list(r) for r in rows]
    else:
        raise ValueError("stop_tokens: pass one list of ids for all prompts, or one list per prompt.")
    for r in rows:
        for s in r:
            if not isinstance(s, (int, np.integer)) or not 0 <= s < vocab:
                raise ValueError(f"stop token {s!r} is not a token id in [0, {vocab}).")
    width = max(1, max(len(r) for r in rows))
    return np.array([list(r) + [-1] * (width - len(r)) for r in rows], np.int32)


def check_request(config: Config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (), max_len: int | None = None,
                  prefill_chunk: int = 512) -> tuple[list[np.ndarray], Any, list[int], np.ndarray, int]:
    """Validate a generation request against the model config alone (no weights needed, so a CLI can refuse
    a bad prompt or flag before loading 700 GB). Returns (prompt rows, sampling, max_new per prompt, stop-token
    array, length limit); raises ValueError naming the problem.
    """
    c = config
    rows = _check_prompts(prompts, c)
    b = len(rows)
    num = lambda x: float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else x  # noqa: E731
    top_k = int(top_k) if isinstance(top_k, np.integer) else top_k
    sp = sampling.Sampling(num(temperature), num(top_p), top_k).check(c.vocab_size)
    max_new = _per_prompt(max_new_tokens, b, "max_new_tokens")
    for i, m in enumerate(max_new):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"max_new_tokens={m!r} (prompt {i}): must be an integer >= 1.")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1.")
    lens = np.array([len(r) for r in rows], np.int32)
    limit = c.max_position_embeddings if max_len is None else min(int(max_len), c.max_position_embeddings)
    for i in range(b):
        if lens[i] + max_new[i] > limit:
            what = "max_len" if max_len is not None and max_len < c.max_position_embeddings \
                else "max_position_embeddings"
            raise ValueError(f"prompt {i}: {lens[i]} prompt tokens + max_new_tokens={max_new[i]} = "
                             f"{lens[i] + max_new[i]} exceeds {what}={limit}; shorten the prompt or "
                             "lower max_new_tokens.")
    return rows, sp, max_new, _stop_array(stop_tokens, b, c.vocab_size), limit


def generate_with_stats(params: Params, config: Config, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int | Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
                        parallel: Parallelism | None = None, callback: Callback | None = None, mtp: bool = False,
                        max_len: int | None = None, prefill_chunk: int = 512,
                        return_logits: bool = False, record: bool = False) -> GenerationResult:
    """`generate`, also returning timings, MTP acceptance and (optionally) the logits of every new token.

    Extra args: mtp (speculative decoding with the MTP module), max_len (cache capacity in tokens; default:
    a bucket just above the longest prompt + its max_new_tokens), prefill_chunk (prompt tokens per prefill
    call: bounds prefill memory for long prompts), return_logits (keep each new token's logits; testing),
    record (a rollout for RL: each new token's sampling log-prob and kept vocabulary, and the DSA keys and
    MoE routing of every token fed, in `GenerationResult.record`; plain sampling decode only).
    """
    c = config
    parallel_lib.check(parallel, c)
    if record and (mtp or temperature == 0.0):
        raise ValueError("record=True records a sampled rollout: it needs temperature > 0 and mtp=False.")
    if mtp and "mtp" not in params:
        raise ValueError("mtp=True needs params with an MTP module (num_nextn_predict_layers=1 and MTP weights "
                         "loaded); HF-transformers checkpoints do not save it.")
    rows, sp, max_new, stop, limit = check_request(
        c, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_tokens=stop_tokens, max_len=max_len, prefill_chunk=prefill_chunk)
    b = len(rows)
    lens = np.array([len(r) for r in rows], np.int32)
    s_max = limit if max_len is not None else cache_length(int(np.max(lens + np.array(max_new))), c)

    # Prompt bucket, split into equal chunks so one compiled prefill serves them all.
    chunk = min(bucket(int(lens.max()), MIN_BUCKET), prefill_chunk, s_max)
    n_chunks = -(-int(lens.max()) // chunk)
    width = n_chunks * chunk
    toks = np.zeros((b, width + 1), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    ar = np.arange(width, dtype=np.int32)[None]
    pos = np.where(ar < lens[:, None], ar, -1).astype(np.int32)
    mtp_pos = np.where(ar < lens[:, None] - 1, ar, -1).astype(np.int32)  # next token known inside the prompt

    consts = _Consts(jax.random.key(seed), jnp.arange(b, dtype=jnp.int32), jnp.asarray(max_new, jnp.int32),
                     jnp.asarray(stop), jnp.float32(sp.temperature), jnp.float32(sp.top_p), jnp.int32(sp.top_k))
    kw = dict(config=c, greedy=sp.greedy, with_logits=return_logits, parallel=parallel, record=record)

    t0 = time.perf_counter()
    cache = cache_lib.init_cache(c, b, s_max, mtp=mtp)
    if parallel is not None:  # params and cache by the layout's rules; XLA partitions the rest of each step
        params = parallel.place_params(params, c)
        cache = parallel.place(cache, cache_lib.axes_of(cache))
    last_hidden = jnp.zeros((b, c.hidden_size), c.compute_dtype)
    prompt_sel = []
    for k in range(n_chunks):
        sl = slice(k * chunk, (k + 1) * chunk)
        cache, last_hidden, sel = _prefill_chunk(params, cache, toks[:, sl], pos[:, sl], toks[:, k * chunk + 1:
                                                 (k + 1) * chunk + 1], mtp_pos[:, sl], lens - 1 - k * chunk,
                                                 last_hidden, config=c, use_mtp=mtp, parallel=parallel,
                                                 record=record)
        prompt_sel.append(sel)
    state, out = _start(params, cache, last_hidden, consts, use_mtp=mtp, **kw)
    jax.block_until_ready(out)
    t1 = time.perf_counter()

    new_tokens: list[list[int]] = [[] for _ in range(b)]
    kept_logits: list[list[np.ndarray]] = [[] for _ in range(b)]
    counters = {"steps": 0, "drafted": 0, "accepted": 0}
    recs: list[dict[str, list]] = [{"logprobs": [], "masks": [], "selection": []} for _ in range(b)]

    def consume(o: _Out, decode_step: bool = True) -> bool:
        t = np.asarray(o.tokens)
        n = np.asarray(o.n_new)
        counters["steps"] += int(decode_step and n.any())
        fresh = [t[i, :n[i]].tolist() for i in range(b)]
        lg = np.asarray(o.logits) if return_logits else None
        rec = jax.tree.map(np.asarray, o.record) if record else None
        for i in range(b):
            new_tokens[i].extend(fresh[i])
            if return_logits and n[i]:
                kept_logits[i].append(lg[i, :n[i]])
            if record and n[i]:
                recs[i]["logprobs"].append(rec["logprob"][i])
                recs[i]["masks"].append(rec["mask"][i])
                if rec.get("selection") is not None:  # a decode step: the fed token's keys and routing
                    recs[i]["selection"].append({k: v[i, 0] for k, v in rec["selection"].items()})
        counters["drafted"] += int(np.asarray(o.drafted).sum())
        counters["accepted"] += int(np.asarray(o.accepted).sum())
        if callback is not None and n.any():
            callback(fresh)
        return bool(np.asarray(o.done).all())

    step = functools.partial(_spec_step, **{k: v for k, v in kw.items() if k != "record"}) if mtp else \
        functools.partial(_step, **kw)
    finished = consume(out, decode_step=False)  # the first tokens, streamed right after the prefill
    pending: _Out | None = None
    # Each step emits at least one token per active sequence, so max(max_new) - 1 steps finish everyone.
    # The next step is dispatched before the previous one's tokens are read (overlapping host and device).
    for _ in range(0 if finished else max(max_new) - 1):
        state, nxt = step(params, state, consts)
        if pending is not None and consume(pending):
            pending = None
            break
        pending = nxt
    if pending is not None:
        consume(pending)
    jax.block_until_ready(state)
    t2 = time.perf_counter()

    n_out = sum(len(t) for t in new_tokens)
    stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "prompt_tokens": int(lens.sum()), "new_tokens": n_out,
             "decode_tokens": n_out - b, "steps": counters["steps"], "drafted": counters["drafted"],
             "accepted": counters["accepted"], "cache_len": s_max, "prefill_chunk": chunk,
             "acceptance_rate": counters["accepted"] / counters["drafted"] if counters["drafted"] else float("nan")}
    logits = [np.concatenate(x, 0) for x in kept_logits] if return_logits else None
    return GenerationResult(new_tokens, logits, stats, _records(recs, prompt_sel, lens) if record else None)


def _records(recs: list[dict[str, list]], prompt_sel: list[dict[str, jax.Array]], lens: np.ndarray) -> list[dict]:
    """Per prompt: log-probs, masks, and the selections of its prompt tokens then of its fed new tokens."""
    prompt = {k: np.concatenate([np.asarray(s[k]) for s in prompt_sel], axis=1) for k in prompt_sel[0]}
    out = []
    for i, r in enumerate(recs):
        sel = {k: np.concatenate([v[i, :lens[i]]] + [np.asarray(s[k])[None] for s in r["selection"]], axis=0)
               for k, v in prompt.items()}
        out.append({"logprobs": np.asarray(r["logprobs"], np.float32), "masks": np.stack(r["masks"]),
                    "selection": sel})
    return out


def generate(params: Params, config: Config, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int], temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
             parallel: Parallelism | None = None,
             callback: Callback | None = None, mtp: bool = False, max_len: int | None = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """Generate continuations of a batch of token-id prompts of different lengths.

    Args:
      params: the params pytree (`dsjax.init_params`, `checkpoints.load_hf`, ...).
      config: the model `Config`.
      prompts: B prompts, each a non-empty list of token ids < vocab_size (lengths may differ).
      max_new_tokens: new tokens per prompt (one int, or one per prompt).
      temperature: 0 = greedy; else sample from softmax(logits / temperature).
      top_p: nucleus truncation (1 = off). top_k: keep the k most likely tokens (0 = off).
      seed: PRNG seed; the same seed gives the same tokens.
      stop_tokens: ids that end a sequence (kept as its last token): one list for all, or one per prompt.
      parallel: optional layout, e.g. `sharding.MeshParallelism(mesh)`: params and cache are placed by its
        rules, MoE runs expert-parallel and attention context-parallel inside every step.
      callback: called after each decode step with the new tokens per prompt (list of B lists, some empty).
      mtp: speculative decoding with the MTP module (needs MTP weights).
      max_len: cache capacity in tokens (default: just above the longest prompt + max_new_tokens).
      prefill_chunk: prompt tokens per prefill call (long prompts are prefilled in chunks).
    Returns:
      B lists of new token ids.
    """
    return generate_with_stats(params, config, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, stop_tokens=stop_tokens, parallel=parallel,
                               callback=callback, mtp=mtp, max_len=max_len, prefill_chunk=prefill_chunk).tokens
