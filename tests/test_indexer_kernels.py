"""Pallas lightning-indexer kernels (TPU Mosaic, GPU Triton) in interpret mode against the XLA reference:
causal edges, tile boundaries, chunked prefill / decode (T != S), padding keys, packed segments, ties,
bf16; chunked top-k through the dispatch; the model's indexer on every backend; TPU race detection. The
kernels are compiled by the real compilers in tests/test_tpu_compile.py (Mosaic / XLA:TPU, at these tests'
shapes and tiles) and tests/test_gpu_compile.py (Triton to sm_90 / sm_100)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import dsjax
import pallas_kernels
from dsjax import attention
from dsjax.rope import cos_sin
from pallas_kernels import indexer_gpu, indexer_tpu
from pallas_kernels import reference as R

KERNEL_BACKENDS = ("pallas_tpu", "pallas_gpu")
# small tiles, so the tests cross many tile boundaries and exercise the causal skip
_SMALL_TILES = {"pallas_tpu": dict(block_q=8, block_k=128), "pallas_gpu": dict(block_k=32)}


def _kernel(backend):
    fn = indexer_tpu.indexer_scores_tpu if backend == "pallas_tpu" else indexer_gpu.indexer_scores_gpu
    return functools.partial(fn, interpret=True, **_SMALL_TILES[backend])


def np_init(specs, config, seed=0):
    """Random params for a `ParamSpec` tree drawn with numpy: `dsjax.init_params` compiles one random
    op per leaf shape, which dominates these tests' runtime on a loaded CPU."""
    rng = np.random.default_rng(seed)

    def make(s):
        dt = dsjax.params.param_dtype(s, config)
        if s.init in ("ones", "zeros"):
            return jnp.full(s.shape, 1.0 if s.init == "ones" else 0.0, dt)
        return jnp.asarray(rng.standard_normal(s.shape) * config.initializer_range, dt)

    return jax.tree.map(make, specs, is_leaf=lambda x: isinstance(x, dsjax.params.ParamSpec))


def _inputs(seed, b, t, s, hi=4, di=32, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy: jax.random compiles once per shape
    q = jnp.asarray(rng.standard_normal((b, t, hi, di)), dtype)
    w = jnp.asarray(rng.standard_normal((b, t, hi)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, di)), dtype)
    return q, w, k


def _check_scores(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))  # the mask is exact
    fin = np.isfinite(ref)
    assert np.isfinite(out[fin]).all()
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-5, atol=1e-4)


def _case(name, b=2):
    """(t, s, q_pos [b, t], k_pos [b, s], q_seg, k_seg) of one visibility pattern."""
    rng = np.random.default_rng(7)
    if name == "prefill":  # T = S, neither a multiple of any tile
        t = s = 300
        qp = kp = np.broadcast_to(np.arange(s), (b, s))
        return t, s, qp, kp, None, None
    if name == "chunked_prefill":  # the last 13 tokens over a 300-slot cache whose last 20 slots are empty
        t, s = 13, 300
        qp = np.broadcast_to(np.arange(267, 280), (b, t))
        kp = np.broadcast_to(np.where(np.arange(s) < 280, np.arange(s), -1), (b, s))
        return t, s, qp, kp, None, None
    if name == "decode":
        t, s = 1, 300
        return t, s, np.array([[299], [150]]), np.broadcast_to(np.arange(s), (b, s)), None, None
    if name == "packed":  # three documents in one row, positions restart
        lens = (13, 100, 47)
        t = s = sum(lens)
        pos = np.concatenate([np.arange(n) for n in lens])
        seg = np.concatenate([np.full(n, i) for i, n in enumerate(lens)])
        return t, s, *(np.broadcast_to(pos, (b, t)),) * 2, *(np.broadcast_to(seg, (b, t)),) * 2
    if name == "shuffled":  # positions in no particular order (the skip must not assume monotone blocks)
        t, s = 40, 300
        qp = np.stack([rng.permutation(s)[:t] for _ in range(b)])
        kp = np.stack([np.where(rng.random(s) < 0.1, -1, rng.permutation(s)) for _ in range(b)])
        return t, s, qp, kp, None, None
    raise ValueError(name)


@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "decode", "packed", "shuffled"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_scores_match_reference(backend, case):
    b = 2
    t, s, qp, kp, qs, ks = _case(case, b)
    q, w, k = _inputs(len(case), b, t, s)
    qp, kp = jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32)
    ref = R.indexer_scores_naive(q, w, k, q_positions=qp, k_positions=kp)
    if qs is not None:
        ref = jnp.where(R.visibility(qp, kp, jnp.asarray(qs), jnp.asarray(ks)), ref, -jnp.inf)
    zq, zk = jnp.zeros_like(qp), jnp.zeros_like(kp)
    qs = zq if qs is None else jnp.asarray(qs, jnp.int32)
    ks = zk if ks is None else jnp.asarray(ks, jnp.int32)
    _check_scores(_kernel(backend)(q, w, k, qp, kp, qs, ks), ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dispatch_scores_bf16(backend):
    """bf16 q/k (the model's dtype) with f32 accumulation, through the public op and default tiles."""
    b, t, s = 1, 40, 200
    q, w, k = _inputs(3, b, t, s, dtype=jnp.bfloat16)
    pos = jnp.arange(s - t, s)
    out = pallas_kernels.indexer_scores(q, w, k, q_positions=pos, backend=backend, interpret=True)
    ref = R.indexer_scores(q.astype(jnp.float32), w, k.astype(jnp.float32), q_positions=pos)
    _check_scores(out, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_chunked_matches_reference(backend):
    """Chunked top-k (chunk 64 over T = 150: a ragged last chunk) equals the XLA selection as a set;
    rows with fewer visible keys than k are filled with -1; decode rows (T = 1) too."""
    b, s, topk = 2, 150, 48
    q, w, k = _inputs(11, b, s, s)
    pos = jnp.arange(s)
    got = np.asarray(pallas_kernels.indexer_topk(q, w, k, topk=topk, q_positions=pos, backend=backend,
                                                 interpret=True, chunk_size=64))
    want = np.asarray(R.indexer_topk(q, w, k, topk=topk, q_positions=pos))
    assert got.shape == (b, s, topk) and got.dtype == np.int32
    for bb in range(b):
        for tt in range(s):
            assert set(got[bb, tt]) == set(want[bb, tt]), (bb, tt)
    assert (got[:, 10, 11:] == -1).all() and set(got[0, 10, :11]) == set(range(11))
    dec = pallas_kernels.indexer_topk(q[:, -1:], w[:, -1:], k, topk=topk, q_positions=jnp.array([s - 1]),
                                      backend=backend, interpret=True)
    np.testing.assert_array_equal(np.sort(dec[:, 0], -1), np.sort(want[:, -1], -1))


@pytest.mark.parametrize("backend", ("xla",) + KERNEL_BACKENDS)
def test_topk_ties_resolve_to_the_lower_key_index_on_every_backend(backend):
    """Exact ties straddling the k-th place: keys repeated 4 times (equal scores), and rows whose queries see
    only ReLU zeros for most keys. Every backend must select exactly the keys of one rule: higher score
    first, then the lower key index (what rollouts and training need to agree on)."""
    b, s, topk, t = 1, 128, 10, 16
    q, w, _ = _inputs(5, b, t, s)
    k = jnp.repeat(_inputs(6, b, 1, s // 4)[2], 4, axis=1)
    k = k.at[:, s // 2:].set(-jnp.abs(k[:, s // 2:]))  # second half: ...
    q = q.at[:, t // 2:].set(jnp.abs(q[:, t // 2:]))  # ... all-negative logits for these queries: ReLU zeros
    w = jnp.abs(w)
    pos = jnp.arange(s - t, s)
    scores = np.asarray(R.indexer_scores(q, w, k, q_positions=pos))
    got = np.asarray(pallas_kernels.indexer_topk(q, w, k, topk=topk, q_positions=pos, backend=backend,
                                                 interpret=True))
    n_tied = []
    for tt in range(t):
        row = np.where(np.arange(s) <= pos[tt], scores[0, tt], -np.inf)
        want = np.argsort(-row, kind="stable")[:topk]  # stable: equal scores keep the lower index first
        assert set(got[0, tt]) == set(want.tolist()), (tt, sorted(got[0, tt]), sorted(want))
        n_tied.append(int(np.sum(row == row[want[-1]])))
    assert max(n_tied) > 2  # the test does exercise ties at the boundary


def test_tpu_kernel_no_races():
    """The TPU-faithful simulator: race detection, NaN-poisoned buffers, one skipped (future) tile."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ip

    b, t, s = 1, 16, 256
    q, w, k = _inputs(9, b, t, s)
    qp, kp = jnp.arange(t)[None].astype(jnp.int32), jnp.arange(s)[None].astype(jnp.int32)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    out = indexer_tpu.indexer_scores_tpu(q, w, k, qp, kp, jnp.zeros_like(qp), jnp.zeros_like(kp),
                                         block_q=8, block_k=128, interpret=params)
    assert ip.races is not None and not ip.races.races_found
    _check_scores(out, R.indexer_scores_naive(q, w, k, q_positions=qp))


def test_needed_key_blocks():
    """Block j is needed iff some non-padding key in it is not after the block's last query."""
    rng = np.random.default_rng(0)
    qp = rng.integers(-1, 64, (2, 16)).astype(np.int32)
    kp = np.where(rng.random((2, 64)) < 0.2, -1, rng.integers(0, 64, (2, 64))).astype(np.int32)
    got = np.asarray(indexer_tpu.needed_key_blocks(jnp.asarray(qp), jnp.asarray(kp), 4, 8))
    for b in range(2):
        for i in range(4):
            qmax = qp[b, 4 * i:4 * i + 4].max()
            need = [j for j in range(8) if any(0 <= x <= qmax for x in kp[b, 8 * j:8 * j + 8])]
            assert got[b, i] == (max(need) + 1 if need else 0)


def test_model_indexer_runs_through_every_backend():
    """The model's DSA attention (L > index_topk) gives the same output with each indexer backend."""
    cfg = dsjax.Config.preset("tiny", index_topk=16)
    p = np_init(dsjax.params.block_specs(cfg, moe=False)["attn"], cfg)
    length = 40
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, length, cfg.hidden_size)), jnp.float32)
    pos = jnp.arange(length)[None]
    cos, sin = cos_sin(cfg, pos)

    def run(c):
        return jax.jit(lambda p, x: attention.mla(p, x, cos, sin, c, positions=pos)[0])(p, x)

    outs = {b: run(cfg.replace(indexer_backend=b, kernel_interpret=True)) for b in ("xla",) + KERNEL_BACKENDS}
    dense = run(cfg.replace(index_topk=length))
    assert np.abs(np.asarray(outs["xla"] - dense)).max() > 1e-4  # the indexer did prune
    for backend in KERNEL_BACKENDS:
        np.testing.assert_allclose(outs[backend], outs["xla"], atol=1e-5, rtol=1e-5)
