"""The Pallas sparse MLA kernels (TPU Mosaic, GPU Triton) in interpret mode against the XLA reference:
forward, lse and gradients (through the public op's custom_vjp), split-K decode (GPU), decode over the stacked
packed cache (TPU), the TPU simulator with race detection, and the full model with the attention backend forced to each kernel.
The real compilers run in tests/test_tpu_compile.py (Mosaic / XLA:TPU, every TPU shape and block size here)
and tests/test_gpu_compile.py (Triton to sm_90 / sm_100 cubins)."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import dsjax
from dsjax import cache as cache_lib
from dsjax import model as model_lib
import pallas_kernels
from pallas_kernels import reference as R
from pallas_kernels import latent_pack, sparse_mla_gpu, sparse_mla_tpu

KERNELS = {"pallas_tpu": sparse_mla_tpu, "pallas_gpu": sparse_mla_gpu}
SCALE = 0.3


def _inputs(seed, b=2, t=13, s=29, h=3, dc=32, dr=16, k=21, dtype=np.float32, lengths=None):
    """Random queries/latents and distinct random indices with -1 slots and an all-invalid row (b=0, t=3).

    lengths: per-sequence visible prefix (decode over a cache): slots pointing past it become -1.
    Built with numpy: eager jax.random ops would compile once per shape.
    """
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
    qn, qr, kvn, kr = arr(b, t, h, dc), arr(b, t, h, dr), arr(b, s, dc), arr(b, s, dr)
    idx = np.argsort(rng.uniform(size=(b, t, s)), axis=-1)[..., :k].astype(np.int32)
    idx[rng.uniform(size=(b, t, k)) < 0.3] = -1
    if lengths is not None:
        idx = np.where(idx < np.asarray(lengths)[:, None, None], idx, -1)
    if t > 3:
        idx[0, 3] = -1
    return qn, qr, kvn, kr, jnp.asarray(idx)


# The TPU kernel runs bf16 only (f32 accumulation) at widths Mosaic accepts: Dc a multiple of 256 (the packed
# row's lane-aligned halves), so its tests use the kernel's real Dr = 64 and Dc = 256 and compare with the f32
# reference of the bf16-cast inputs. The GPU kernel keeps f32 at small power-of-two widths.
TPU_DIMS = dict(dc=256, dr=64, dtype=jnp.bfloat16)
TOL = {"pallas_gpu": dict(atol=2e-5, rtol=1e-5), "pallas_tpu": dict(atol=3e-2, rtol=2e-2)}
GRAD_TOL = {"pallas_gpu": dict(atol=5e-5, rtol=1e-4), "pallas_tpu": dict(atol=6e-2, rtol=3e-2)}


def _case(backend, seed, **kw):
    return _inputs(seed, **({**kw, **TPU_DIMS} if backend == "pallas_tpu" else kw))


def _ref_args(args):
    return tuple(a.astype(jnp.float32) for a in args[:4]) + (args[4],)


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _assert_lse_close(lse, ref, atol):
    lse, ref = _f32(lse), _f32(ref)
    assert np.array_equal(np.isposinf(lse), np.isposinf(ref)) and np.isfinite(ref[~np.isposinf(ref)]).all()
    np.testing.assert_allclose(np.where(np.isinf(ref), 0, lse), np.where(np.isinf(ref), 0, ref), atol=atol)


@functools.partial(jax.jit, static_argnames=("backend", "block_k"))
def _kernel_fwd(qn, qr, kvn, kr, idx, backend, block_k):
    return KERNELS[backend].forward(qn, qr, kvn, kr, idx, scale=SCALE, interpret=True, block_k=block_k)


def _loss_and_grads(fn, args, w_out, w_lse):
    """Value and gradients of sum(out*w_out) + sum(lse*w_lse) over the four float inputs."""

    def loss(qn, qr, kvn, kr):
        o, lse = fn(qn, qr, kvn, kr, args[4])
        lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args[:4])


@functools.partial(jax.jit, static_argnames=("backend",))
def _op_grads(args, w_out, w_lse, backend):
    fn = functools.partial(pallas_kernels.sparse_mla_with_lse, scale=SCALE, backend=backend,
                           interpret=backend != "xla")
    return _loss_and_grads(fn, args, w_out, w_lse)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("block_k", [None, 16])
def test_forward_matches_reference(backend, block_k):
    """K = 21 is not a multiple of either block; block_k = 16 also walks several chunks; -1 slots and an
    all-invalid query (zeros, lse = +inf). Kernels never dereference an index >= S: it counts as unused."""
    args = _case(backend, 0)
    idx = np.asarray(args[4])
    out_of_range, unused = idx.copy(), idx.copy()
    out_of_range[:, :, 0], out_of_range[:, :, 1], unused[:, :, :2] = args[2].shape[1], 10 ** 6, -1
    out, lse = _kernel_fwd(*args[:4], jnp.asarray(out_of_range), backend=backend, block_k=block_k)
    ref, ref_lse = R.sparse_mla_with_lse(*_ref_args(args)[:4], jnp.asarray(unused), scale=SCALE)
    np.testing.assert_allclose(_f32(out), ref, **TOL[backend])
    _assert_lse_close(lse, ref_lse, TOL[backend]["atol"])
    assert np.all(_f32(out[0, 3]) == 0)


@pytest.mark.parametrize("backend", list(KERNELS))
def test_forward_bf16_single_head(backend):
    dims = dict(TPU_DIMS) if backend == "pallas_tpu" else dict(dc=64, dr=16, dtype=jnp.bfloat16)
    args = _inputs(1, b=1, t=9, s=40, h=1, k=33, **dims)
    out, lse = pallas_kernels.sparse_mla_with_lse(*args, scale=SCALE, backend=backend, interpret=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 9, 1, dims["dc"])
    ref, ref_lse = R.sparse_mla_with_lse(*(a.astype(jnp.float32) for a in args[:4]), args[4], scale=SCALE)
    np.testing.assert_allclose(_f32(out), ref, atol=2e-2, rtol=2e-2)
    _assert_lse_close(lse, ref_lse, 2e-2)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("case", ["f32", "bf16_h1"])
def test_gradients_match_reference(backend, case):
    """dQ, dK/dV of the kernels' custom_vjp (with cotangents on both out and lse) vs the XLA reference."""
    if case == "f32":  # the TPU kernel computes bf16: its "f32" case is the same shapes in bf16
        args, tol = _case(backend, 3), GRAD_TOL[backend]
    else:
        dims = dict(TPU_DIMS) if backend == "pallas_tpu" else dict(dc=64, dr=16, dtype=jnp.bfloat16)
        args, tol = _inputs(4, b=1, t=9, s=40, h=1, k=33, **dims), dict(atol=6e-2, rtol=5e-2)
    b, t, h, dc = args[0].shape
    w_out = _normal(10, b, t, h, dc)
    w_lse = _normal(11, b, t, h)
    val, grads = _op_grads(args, w_out, w_lse, backend=backend)
    ref_args = tuple(a.astype(jnp.float32) for a in args[:4]) + (args[4],)
    ref_val, ref_grads = _op_grads(ref_args, w_out, w_lse, backend="xla")
    np.testing.assert_allclose(val, ref_val, **tol)
    for g, r, x in zip(grads, ref_grads, args):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert np.isfinite(_f32(g)).all()
        np.testing.assert_allclose(_f32(g), r, **tol)


def test_tpu_backward_token_chunks_and_small_blocks():
    """The TPU backward's token-chunk loop (T = 13 over chunks of 8) and several k-chunks per query, from
    rows whose valid slots are scattered (compacted by the wrapper)."""
    args = _case("pallas_tpu", 5)
    ref_args = _ref_args(args)
    out, lse = R.sparse_mla_with_lse(*ref_args, scale=SCALE)
    dout = _normal(12, *out.shape)
    dlse = jnp.zeros(lse.shape, jnp.float32)
    got = jax.jit(lambda *a: sparse_mla_tpu.backward(*a, scale=SCALE, interpret=True, block_k=8,
                                                     token_chunk=5))(*args, out, lse, dout, dlse)
    _, vjp = jax.vjp(lambda *x: R.sparse_mla_with_lse(*x, args[4], scale=SCALE), *ref_args[:4])
    for g, r in zip(got, vjp((dout, dlse))):
        np.testing.assert_allclose(_f32(g), r, **GRAD_TOL["pallas_tpu"])


# ----------------------------------------------------------------------------- decode (T = 1)
def test_gpu_split_k_decode_with_per_sequence_lengths():
    """T = 1 over a cache with per-sequence lengths (one empty): the split-K path and its combine."""
    lengths = [20, 3, 0, 41]
    args = _inputs(6, b=4, t=1, s=48, h=4, dc=32, dr=16, k=40, lengths=lengths)
    ref, ref_lse = R.sparse_mla_with_lse(*args, scale=SCALE)
    # 3 chunks of 16 slots in 2 splits (uneven: the second split has one chunk, many queries none)
    out, lse = jax.jit(lambda *a: sparse_mla_gpu.forward(*a, scale=SCALE, interpret=True, block_k=16,
                                                         num_splits=2))(*args)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    _assert_lse_close(lse, ref_lse, 2e-5)
    assert np.all(_f32(out[2]) == 0)
    # the default splits decode (64 sequences x 2 head blocks, 32 chunks) but not prefill
    assert sparse_mla_gpu.default_num_splits(64 * 1 * 2, 32) == 2
    assert sparse_mla_gpu.default_num_splits(8, 32) == 32
    assert sparse_mla_gpu.default_num_splits(1 * 4096 * 2, 32) == 1


def test_tpu_decode_reads_the_stacked_packed_cache():
    """T = 1 over layer 1 of a stacked packed cache [L, B, S, W] (batch folded into the token axis, global
    row ids), per-sequence lengths with one empty sequence, valid slots first (the indexer's order)."""
    lengths = [20, 3, 0, 41, 7]
    args = _inputs(9, b=5, t=1, s=48, h=8, k=40, lengths=lengths, **TPU_DIMS)
    idx = -np.sort(-np.asarray(args[4]), axis=-1)  # valid first, as indexer_topk emits them
    layers = [latent_pack.pack(*_inputs(20 + i, b=5, t=1, s=48, h=8, k=4, **TPU_DIMS)[2:4]) for i in range(3)]
    layers[1] = latent_pack.pack(args[2], args[3])
    cache = jnp.stack(layers)
    assert cache.shape == (3, 5, 48, latent_pack.row_words(256, 64)) and cache.dtype == jnp.uint32
    out, lse = jax.jit(lambda *a: sparse_mla_tpu.forward_packed(*a, scale=SCALE, interpret=True, block_k=16,
                                                                prefix_valid=True))(
        args[0], args[1], cache, jnp.int32(1), jnp.asarray(idx))
    ref, ref_lse = R.sparse_mla_with_lse(*_ref_args(args)[:4], jnp.asarray(idx), scale=SCALE)
    np.testing.assert_allclose(_f32(out), ref, **TOL["pallas_tpu"])
    _assert_lse_close(lse, ref_lse, TOL["pallas_tpu"]["atol"])
    assert np.all(_f32(out[2]) == 0) and np.all(np.isposinf(_f32(lse[2])))


def test_latent_pack_roundtrip_and_layout():
    """pack/unpack are exact on bf16 values; word j holds columns j and j + Dc/2; rows pad to 128 words."""
    _, _, kvn, kr, _ = _inputs(10, b=2, s=7, k=5, **TPU_DIMS)
    packed = latent_pack.pack(kvn, kr)
    assert packed.shape == (2, 7, 256) and latent_pack.row_words(512, 64) == 384
    back = latent_pack.unpack(packed, 256, 64)
    assert np.array_equal(_f32(back[0]), _f32(kvn)) and np.array_equal(_f32(back[1]), _f32(kr))
    words = np.asarray(packed)
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16)).astype(np.uint32)
    assert np.array_equal(words[..., 5] & 0xFFFF, bits(kvn[..., 5]))
    assert np.array_equal(words[..., 5] >> 16, bits(kvn[..., 133]))
    assert np.array_equal(words[..., 128 + 3] >> 16, bits(kr[..., 35]))
    assert np.all(words[..., 160:] == 0)


# ----------------------------------------------------------------------------- TPU simulator
def test_tpu_kernels_under_race_detection():
    """TPU-faithful interpretation: DMA semantics, NaN-poisoned scratch, race detection (tiny: ~1 ms/DMA)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    args = _inputs(7, b=1, t=4, s=20, h=2, k=12, **TPU_DIMS)  # 2 chunks of 8: both buffer slots
    ref_args = _ref_args(args)
    ref, ref_lse = R.sparse_mla_with_lse(*ref_args, scale=SCALE)
    dout = _normal(13, *ref.shape)
    dlse = _normal(14, *ref_lse.shape)
    try:
        out, lse = sparse_mla_tpu.forward(*args, scale=SCALE, interpret=params, block_k=8)
        jax.block_until_ready(out)
        assert not tpu_interpret.races.races_found
        grads = sparse_mla_tpu.backward(*args, ref, ref_lse, dout, dlse, scale=SCALE, interpret=params,
                                        block_k=8, token_chunk=3)
        jax.block_until_ready(grads)
        assert not tpu_interpret.races.races_found
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    np.testing.assert_allclose(_f32(out), ref, **TOL["pallas_tpu"])
    _assert_lse_close(lse, ref_lse, TOL["pallas_tpu"]["atol"])
    _, vjp = jax.vjp(lambda *x: R.sparse_mla_with_lse(*x, args[4], scale=SCALE), *ref_args[:4])
    for g, r in zip(grads, vjp((dout, dlse))):
        np.testing.assert_allclose(_f32(g), r, **GRAD_TOL["pallas_tpu"])


# ----------------------------------------------------------------------------- the model
# One dense layer: the attention path is the same in MoE layers. One layer because the TPU kernel computes in
# bf16: the next layer's indexer would see its slightly different output and may flip a near-tie top-k choice
# (seen: one position of 48), which is a different selection, not a kernel error. The latent is widened to 256
# (the TPU kernel's lane-aligned packed halves), the rope to 64.
MODEL_CFG = dsjax.Config.preset("tiny", index_topk=16, num_hidden_layers=1, first_k_dense_replace=1,
                                kv_lora_rank=256, qk_rope_head_dim=64, index_head_dim=64)
# the TPU kernel computes in bf16 (f32 accumulation) where the XLA path runs these f32 models in f32
MODEL_TOL = {"pallas_gpu": dict(atol=2e-4, rtol=2e-4), "pallas_tpu": dict(atol=3e-3, rtol=2e-2)}


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)  # numpy weights: init_params' eager per-leaf ops would compile per shape
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape).astype(a.dtype)),
                        dsjax.abstract_params(cfg))


@pytest.fixture(scope="module")
def model_setup():
    params = _params(MODEL_CFG)
    tokens = np.random.default_rng(1).integers(0, MODEL_CFG.vocab_size, (2, 24))  # 24 keys > top-k 16: sparse
    return params, tokens, dsjax.forward(params, tokens, MODEL_CFG.replace(attention_backend="xla"))


@pytest.mark.parametrize("backend", list(KERNELS))
def test_model_logits_with_each_kernel(model_setup, backend):
    params, tokens, ref = model_setup
    cfg = MODEL_CFG.replace(attention_backend=backend, kernel_interpret=True)
    jaxpr = str(jax.make_jaxpr(lambda p: dsjax.forward(p, tokens, cfg))(params))
    assert f"sparse_mla_fwd_{backend[len('pallas_'):]}" in jaxpr  # the kernel really runs in the model
    np.testing.assert_allclose(dsjax.forward(params, tokens, cfg), ref, **MODEL_TOL[backend])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cached_step(params, tokens, positions, cache, cfg):
    aux = model_lib.forward_hidden(params, tokens, cfg, positions=positions, cache=cache)
    return model_lib.lm_head(params, aux.hidden), aux.cache


def _prefill_then_decode(params, tokens, cfg, prefill=18, steps=3, cap=32):
    """Logits of a prefill into a `cap`-slot cache followed by `steps` T = 1 decode steps."""
    b = tokens.shape[0]
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    logits, cache = _cached_step(params, jnp.asarray(tokens[:, :prefill]), pos, cache_lib.init_cache(cfg, b, cap), cfg)
    outs = [logits]
    for t in range(prefill, prefill + steps):
        logits, cache = _cached_step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.full((b, 1), t, jnp.int32), cache,
                                     cfg)
        outs.append(logits)
    return np.concatenate([np.asarray(o) for o in outs], axis=1)


# Decode over a two-layer stacked cache (the kernels read layer l of [L, B, S, .]). top-k 31 of a 32-slot
# cache keeps the sparse kernel path (S > k) while every visible key is selected, so no near-tie can differ.
DECODE_CFG = MODEL_CFG.replace(num_hidden_layers=2, first_k_dense_replace=2, index_topk=31)


@pytest.fixture(scope="module")
def decode_ref():
    params = _params(DECODE_CFG)
    tokens = np.random.default_rng(2).integers(0, DECODE_CFG.vocab_size, (2, 24))
    return params, tokens, _prefill_then_decode(params, tokens, DECODE_CFG.replace(attention_backend="xla"))


@pytest.mark.parametrize("backend", list(KERNELS))
def test_model_cached_decode_with_each_kernel(decode_ref, backend):
    """Prefill into a 32-slot cache, then T = 1 decode steps: the kernels attend over [B, S_max] caches
    whose unwritten slots the indexer leaves out (-1), and match the XLA path step by step."""
    params, tokens, ref = decode_ref
    got = _prefill_then_decode(params, tokens, DECODE_CFG.replace(attention_backend=backend, kernel_interpret=True))
    np.testing.assert_allclose(got, ref, **MODEL_TOL[backend])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _model_attention_grads(params, tokens, cfg):
    """Gradients of a logits functional w.r.t. the attention weights (the fine-tuning path, with remat)."""
    w = jnp.cos(jnp.arange(cfg.vocab_size, dtype=jnp.float32))

    def loss(attn):
        p = {**params, "dense": {**params["dense"], "attn": attn}}
        logits = model_lib.forward_with_aux(p, tokens, cfg, remat="full")[0]
        return jnp.sum(logits * w)

    return jax.jit(jax.grad(loss))(params["dense"]["attn"])


@pytest.mark.parametrize("backend", list(KERNELS))
def test_model_gradients_with_each_kernel(model_setup, backend):
    params, tokens, _ = model_setup
    tokens = jnp.asarray(tokens, jnp.int32)
    ref = _model_attention_grads(params, tokens, MODEL_CFG.replace(attention_backend="xla"))
    got = _model_attention_grads(params, tokens, MODEL_CFG.replace(attention_backend=backend,
                                                                   kernel_interpret=True))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        if "indexer" not in str(path):  # top-k indices carry no gradient (the indexer trains on its KL loss)
            assert np.abs(_f32(r)).max() > 0, path
        tol = dict(atol=1e-4, rtol=1e-3) if backend == "pallas_gpu" else dict(atol=3e-3 * np.abs(_f32(r)).max(),
                                                                               rtol=3e-2)
        np.testing.assert_allclose(g, r, err_msg=str(path), **tol)


# ----------------------------------------------------------------------------- dispatch and errors
def test_dispatch_and_clear_errors():
    args = _inputs(8, t=4, k=5)
    implemented = sys.modules["pallas_kernels.sparse_mla"].IMPLEMENTED
    assert set(implemented) == {"xla", "pallas_tpu", "pallas_gpu"}
    assert pallas_kernels.resolve_backend(None, implemented) == "xla"  # on this CPU
    with pytest.raises(ValueError, match="backend='cuda'"):
        pallas_kernels.sparse_mla(*args, scale=SCALE, backend="cuda")
    with pytest.raises(ValueError, match=r"kv_nope has shape \(2, 29, 31\), expected \(2, 29, 32\)"):
        pallas_kernels.sparse_mla(args[0], args[1], args[2][..., :31], args[3], args[4], scale=SCALE)
    with pytest.raises(ValueError, match="indices must be an integer array"):
        pallas_kernels.sparse_mla(*args[:4], args[4].astype(jnp.float32), scale=SCALE, backend="pallas_gpu")
