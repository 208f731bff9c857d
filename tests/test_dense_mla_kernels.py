"""The dense (flash) MLA kernels (TPU Mosaic, GPU Triton) in interpret mode against the XLA reference, and the
block ranges that causal block skipping walks.

Forward, lse and gradients (cotangents on out and lse) at shapes with several query and key blocks, with
packed segments, padding keys and a query offset (a chunk of a longer sequence); the ranges against a brute
force over every (query, key) pair. The real compilers run in tests/test_tpu_compile.py and
tests/test_gpu_compile.py ("dense_mla" cases)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import dense_mla_common as dmc
from pallas_kernels import dense_mla_gpu, dense_mla_tpu
from pallas_kernels import reference as R

KERNELS = {"pallas_tpu": dense_mla_tpu, "pallas_gpu": dense_mla_gpu}
SCALE = 0.3
# small blocks, so the tests walk several query and key blocks (and skip some)
BLOCKS = {"pallas_gpu": dict(block_m=16, block_k=16), "pallas_tpu": dict(block_rows=128, block_k=128)}
BWD_BLOCKS = {"pallas_gpu": dict(block_m=16, block_k=16, dkv_block_k=16),
              "pallas_tpu": dict(block_rows=128, block_k=128, dkv_block_rows=128, dkv_block_k=128)}
# GPU: f32 at small widths. TPU: bf16 compute (f32 accumulation), so it is compared with the f32 reference
# of the bf16-cast inputs at bf16 tolerances.
DIMS = {"pallas_gpu": dict(h=3, dc=32, dr=16, dtype=np.float32, t=70),
        "pallas_tpu": dict(h=3, dc=128, dr=64, dtype=jnp.bfloat16, t=300)}
TOL = {"pallas_gpu": dict(atol=3e-5, rtol=1e-4), "pallas_tpu": dict(atol=4e-2, rtol=3e-2)}


def _visibility(kind, b, t, s, rng):
    """Positions / segment ids of one of the cases (numpy int32)."""
    qp = np.broadcast_to(np.arange(t), (b, t)).copy()
    kp = np.broadcast_to(np.arange(s), (b, s)).copy()
    qs = ks = None
    if kind == "packed":  # self-attention over packed documents: positions restart per segment
        assert s == t
        cuts = np.sort(rng.choice(np.arange(1, t), size=(b, 3), replace=False), axis=1)
        qs = (np.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)
        starts = np.concatenate([np.zeros((b, 1), int), cuts], 1)
        qp = (np.arange(t)[None] - np.take_along_axis(starts, qs, 1)).astype(np.int32)
        kp, ks = qp.copy(), qs.copy()
        kp[:, -3:] = -1  # trailing padding keys
    elif kind == "offset":  # the last t tokens of an s-token sequence (chunked prefill over a cache)
        qp = qp + (s - t)
        kp[1, s // 2:] = -1  # sequence 1 is shorter: padding slots
    return [None if x is None else jnp.asarray(x, jnp.int32) for x in (qp, kp, qs, ks)]


def _case(backend, kind, seed=0, b=2):
    d = DIMS[backend]
    rng = np.random.default_rng(seed)
    t = d["t"]
    s = t if kind != "offset" else t + 37
    if kind == "offset":
        t = t // 2
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(d["dtype"]))
    x = (arr(b, t, d["h"], d["dc"]), arr(b, t, d["h"], d["dr"]), arr(b, s, d["dc"]), arr(b, s, d["dr"]))
    vis = _visibility(kind, b, t, s, rng)
    return x, dict(zip(("q_positions", "k_positions", "q_segment_ids", "k_segment_ids"), vis))


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _loss(fn, w_out, w_lse):
    def loss(*x):
        o, lse = fn(*x)
        return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse) * w_lse)
    return loss


@functools.partial(jax.jit, static_argnames=("backend",))
def _kernel_value_and_grads(x, vis, w_out, w_lse, backend):
    """Loss and gradients through the kernels' own forward and backward (small blocks)."""
    mod = KERNELS[backend]

    @jax.custom_vjp
    def f(*a):
        return mod.forward(*a, scale=SCALE, interpret=True, **vis, **BLOCKS[backend])

    def f_fwd(*a):
        o = f(*a)
        return o, (a, o)

    def f_bwd(res, cot):
        a, (o, lse) = res
        return mod.backward(*a, o, lse, *cot, scale=SCALE, interpret=True, **vis, **BWD_BLOCKS[backend])

    f.defvjp(f_fwd, f_bwd)
    out = f(*x)
    return out, jax.value_and_grad(_loss(f, w_out, w_lse), argnums=(0, 1, 2, 3))(*x)


@jax.jit
def _ref_value_and_grads(x, vis, w_out, w_lse):
    fn = lambda *a: R.dense_mla_with_lse(*a, scale=SCALE, **vis)
    return fn(*x), jax.value_and_grad(_loss(fn, w_out, w_lse), argnums=(0, 1, 2, 3))(*x)


@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("kind", ["causal", "packed", "offset"])
def test_kernel_forward_and_gradients_match_reference(backend, kind):
    x, vis = _case(backend, kind)
    rng = np.random.default_rng(5)
    b, t, h, dc = x[0].shape
    w_out = jnp.asarray(rng.standard_normal((b, t, h, dc), np.float32))
    w_lse = jnp.asarray(rng.standard_normal((b, t, h), np.float32))
    (out, lse), (val, grads) = _kernel_value_and_grads(x, vis, w_out, w_lse, backend=backend)
    (ref, ref_lse), (ref_val, ref_grads) = _ref_value_and_grads(tuple(a.astype(jnp.float32) for a in x), vis,
                                                                w_out, w_lse)
    tol = TOL[backend]
    np.testing.assert_allclose(_f32(out), _f32(ref), **tol)
    ref_lse = _f32(ref_lse)
    assert np.array_equal(np.isposinf(_f32(lse)), np.isposinf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(_f32(lse)[fin], ref_lse[fin], atol=tol["atol"])
    np.testing.assert_allclose(float(val), float(ref_val), rtol=tol["rtol"])
    for g, r, a in zip(grads, ref_grads, x):
        assert g.dtype == a.dtype and g.shape == a.shape
        scale = np.abs(_f32(r)).max()
        assert scale > 0
        np.testing.assert_allclose(_f32(g), _f32(r), atol=tol["atol"] * max(1.0, scale), rtol=tol["rtol"])


@pytest.mark.parametrize("backend", list(KERNELS))
def test_public_op_custom_vjp_and_default_blocks(backend):
    """`pallas_kernels.dense_mla_with_lse` with the backend forced: the dispatch's custom_vjp and the kernels'
    default blocks (one block here) against the reference."""
    d = dict(DIMS[backend], t=13)
    rng = np.random.default_rng(2)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(d["dtype"]))
    x = (arr(2, 13, d["h"], d["dc"]), arr(2, 13, d["h"], d["dr"]), arr(2, 13, d["dc"]), arr(2, 13, d["dr"]))
    w_out = jnp.asarray(rng.standard_normal((2, 13, d["h"], d["dc"]), np.float32))
    loss = lambda be: jax.jit(jax.value_and_grad(_loss(functools.partial(
        pallas_kernels.dense_mla_with_lse, scale=SCALE, backend=be, interpret=be != "xla"), w_out, 0.5),
        argnums=(0, 1, 2, 3)))
    val, grads = loss(backend)(*x)
    ref_val, ref_grads = loss("xla")(*(a.astype(jnp.float32) for a in x))
    np.testing.assert_allclose(float(val), float(ref_val), rtol=TOL[backend]["rtol"])
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(_f32(g), _f32(r), atol=TOL[backend]["atol"] * max(1.0, np.abs(_f32(r)).max()),
                                   rtol=TOL[backend]["rtol"])


# ----------------------------------------------------------------------------- block ranges
def _brute_force_needed(qp, qs, kp, ks, bq, bk):
    """bool [B, nq, nk]: whether a query block and a key block hold any visible pair."""
    vis = (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] >= 0) & (ks[:, None, :] == qs[:, :, None])
    b, t, s = vis.shape
    return vis.reshape(b, t // bq, bq, s // bk, bk).any(axis=(2, 4))


@pytest.mark.parametrize("kind", ["causal", "packed", "offset", "shuffled"])
def test_block_ranges_cover_every_visible_pair_and_skip(kind):
    rng = np.random.default_rng(7)
    b, t, bq, bk = 3, 96, 8, 16
    s = t if kind in ("causal", "packed", "shuffled") else t + 40
    qp, kp, qs, ks = (None if v is None else np.asarray(v) for v in
                      _visibility("packed" if kind == "shuffled" else kind, b, t, s, rng))
    qs = np.zeros((b, t), np.int32) if qs is None else qs
    ks = np.zeros((b, s), np.int32) if ks is None else ks
    if kind == "shuffled":  # no order at all: ranges must stay exact
        perm = rng.permutation(s)
        kp, ks = kp[:, perm], ks[:, perm]
    sp = -(-s // bk) * bk
    qp, qs, kp, ks = (np.asarray(x) for x in dmc.pad_visibility(*(jnp.asarray(x) for x in (qp, qs, kp, ks)), t, sp))
    need = _brute_force_needed(qp, qs, kp, ks, bq, bk)
    lo, hi = (np.asarray(x) for x in dmc.key_block_ranges(*(jnp.asarray(x) for x in (qp, qs, kp, ks)), bq, bk))
    qlo, qhi = (np.asarray(x) for x in dmc.query_block_ranges(*(jnp.asarray(x) for x in (qp, qs, kp, ks)), bq, bk))
    j = np.arange(need.shape[2])
    i = np.arange(need.shape[1])
    in_range = (j[None, None, :] >= lo[..., None]) & (j[None, None, :] < hi[..., None])
    assert not np.any(need & ~in_range), "a key block with visible pairs is skipped"
    in_qrange = (i[None, :, None] >= qlo[:, None, :]) & (i[None, :, None] < qhi[:, None, :])
    assert not np.any(need & ~in_qrange), "a query block that sees a key block is skipped"
    walked = in_range.sum() / in_range.size
    if kind == "causal":  # the flash diagonal exactly: key blocks up to the block holding the last query
        np.testing.assert_array_equal(hi, np.broadcast_to(((np.arange(t // bq) + 1) * bq - 1) // bk + 1, hi.shape))
        np.testing.assert_array_equal(lo, 0)
        assert np.array_equal(in_range, in_qrange)
    if kind == "packed":  # documents cut the walk further than causality alone
        assert walked < 0.45, walked
    if kind != "shuffled":
        assert walked < 0.7, walked
