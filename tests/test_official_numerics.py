"""`indexer_numerics="official_fp8"` against an emulation of the official V3.2 inference code
(tests/official_reference.py, written from the spec) on a block-FP8-quantised random model whose prefill is
longer than index_topk: the FP8 linear's block semantics, the latent round trip, per-layer FFN outputs,
the indexer's top-k sets on the official layer inputs, attention, and end-to-end logits against the
official code's own prefill-vs-decode noise; and the plain bf16 mode (HF numerics) on the same weights,
which the official mode must beat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
import official_reference as ref
from checkpoints.synthetic import quantize_params
from dsjax import attention, indexer, layers, moe
from dsjax.rope import cos_sin

# Dims of at least two 128-blocks where the official kernels block (hidden, latents, wo input); 16 indexer
# heads so that ReLU zeros do not decide the top-k; index_topk 32 < 96 tokens, 2 groups of 4 experts.
CFG = dsjax.Config.preset(
    "tiny", hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=256, kv_lora_rank=256,
    v_head_dim=64, index_n_heads=16, index_head_dim=128, index_topk=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_nextn_predict_layers=0, n_group=2, topk_group=1, dtype="bfloat16",
    param_dtype="bfloat16", fp8_weight_block=128,
    rope_scaling=dsjax.RopeScaling(factor=4.0, original_max_position_embeddings=512), indexer_numerics="official_fp8")
BF16_MODE = CFG.replace(indexer_numerics="bf16")
L = 96


@pytest.fixture(scope="module")
def setup():
    params = dsjax.init_params(CFG, jax.random.key(0))
    # a non-zero router bias: group selection must use it as the official gate does
    params["moe"]["moe"]["bias"] = jax.random.uniform(jax.random.key(5), params["moe"]["moe"]["bias"].shape,
                                                      minval=-0.05, maxval=0.05)
    p8 = quantize_params(params, CFG)
    tokens = np.random.default_rng(0).integers(2, CFG.vocab_size, (2, L))
    out = {"p8": p8, "jp": jax.tree.map(jnp.asarray, p8), "tokens": tokens, "prefill": [], "decode": []}
    for row in tokens:
        prefill = ref.Model(p8, CFG)  # the whole prompt at once: the naive (MHA) prefill path
        out["prefill"].append(prefill.forward(row))
        out.setdefault("trace", prefill.trace[0])  # the first sequence's layer inputs and outputs
        decode = ref.Model(p8, CFG)  # every token through the decode (absorbed) path, one at a time
        out["decode"].append(np.concatenate([decode.forward(row[i:i + 1]) for i in range(L)]))
    out["prefill"], out["decode"] = np.stack(out["prefill"]), np.stack(out["decode"])
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer(jp, i):
    stack, j = ("dense", i) if i < CFG.n_dense_layers else ("moe", i - CFG.n_dense_layers)
    return jax.tree.map(lambda a: a[j], jp[stack])


def test_fp8_linear_is_the_official_blockwise_gemm(setup):
    """act_quant (UE8M0, per 128-block of K) + FP8 GEMM: equal to the blockwise formula up to fp32
    summation order, i.e. the same bf16 output except for rare last-bit ties."""
    w = setup["p8"]["moe"]["attn"]["wq_a"]
    w0 = {k: v[0] for k, v in w.items()}
    x = np.random.default_rng(1).standard_normal((64, CFG.hidden_size)).astype(np.float32)
    x[:, 7] *= 30.0  # an outlier channel: the blocks' scales differ
    want = ref.fp8_gemm(x, w0)
    got = np.asarray(layers.dense(jnp.asarray(x, jnp.bfloat16), jax.tree.map(jnp.asarray, w0), official=True),
                     np.float32)
    ulp = np.abs(want) * 2.0 ** -7 + 1e-30
    assert np.all(np.abs(got - want) <= ulp), float(np.max(np.abs(got - want) / ulp))
    assert np.mean(got == want) > 0.99
    plain = np.asarray(layers.dense(jnp.asarray(x, jnp.bfloat16), jax.tree.map(jnp.asarray, w0)), np.float32)
    assert _rel(plain, want) > 5 * _rel(got, want) + 1e-3  # skipping act_quant is the big error (spec §7.3)


def test_latent_round_trip_is_applied(setup):
    """The cached latent is the normed latent after an FP8 round trip per 128-block (spec §4.6)."""
    x = jnp.asarray(setup["trace"]["layers"][0]["attn_in"], jnp.bfloat16)[None]
    pos = jnp.arange(L)[None]
    cos, sin = cos_sin(CFG, pos)
    p = _layer(setup["jp"], 0)["attn"]
    _, kv = attention.project(p, x, cos, sin, CFG)
    _, kv_plain = attention.project(p, x, cos, sin, BF16_MODE)
    c = np.asarray(kv.kv[0], np.float32)
    np.testing.assert_array_equal(c, ref.fp8_roundtrip(c))  # already on the FP8 grid: a fixed point
    q8, s = ref.act_quant(c)
    assert np.all(np.log2(s) == np.round(np.log2(s))) and q8.shape[-2] == CFG.kv_lora_rank // 128
    assert not np.array_equal(np.asarray(kv_plain.kv[0], np.float32), c)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_ffn_blocks_match_the_official_code(setup, i):
    """Each FFN block (dense SwiGLU, then MoE with the shared expert) on the official layer input."""
    rec = setup["trace"]["layers"][i]
    lp = _layer(setup["jp"], i)
    x = jnp.asarray(rec["ffn_in"], jnp.bfloat16)
    run = (lambda c: moe.moe(lp["moe"], x[None], c)[0][0]) if i >= CFG.n_dense_layers else \
        (lambda c: layers.swiglu(x, lp["mlp"], c.official_numerics))
    err, err_bf16 = _rel(run(CFG), rec["ffn_out"]), _rel(run(BF16_MODE), rec["ffn_out"])
    assert err <= 1e-2, err
    assert err_bf16 > 2 * err, (err, err_bf16)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_indexer_topk_sets_match_the_official_code(setup, i):
    """On the official layer inputs (x, cq), dsjax's indexer selects the official top-k sets."""
    rec = setup["trace"]["layers"][i]
    p = _layer(setup["jp"], i)["attn"]["indexer"]
    pos = jnp.arange(L)[None]
    cos, sin = cos_sin(CFG, pos)
    x, cq = jnp.asarray(rec["attn_in"], jnp.bfloat16)[None], jnp.asarray(rec["cq"], jnp.bfloat16)[None]

    def sets(cfg):
        q, w, k = indexer.project(p, x, cq, cos, sin, cfg)
        idx = np.asarray(indexer.select(q, w, k, config=cfg, q_positions=pos))[0]
        got = np.zeros((L, L), bool)
        for r in range(L):
            got[r, idx[r][idx[r] >= 0]] = True
        return got

    want = rec["allowed"]
    rows = np.arange(L) >= CFG.index_topk  # rows where the top-k really prunes

    def jaccard(got):
        inter, union = (got & want).sum(1)[rows], (got | want).sum(1)[rows]
        return float(np.mean(inter / union))

    assert jaccard(sets(CFG)) >= 0.99, jaccard(sets(CFG))
    assert np.array_equal(sets(CFG)[~rows], want[~rows])  # all causal keys where nothing is pruned
    assert jaccard(sets(BF16_MODE)) < jaccard(sets(CFG))


def test_attention_blocks_within_the_official_codes_own_noise(setup):
    """Every attention block on the official layer input: dsjax (absorbed form, FP8 round-tripped latent) is
    as close to the official prefill (naive form) as the official decode form is (~1%, bf16 noise), and much
    closer than the bf16 mode."""
    pos = jnp.arange(L)[None]
    cos, sin = cos_sin(CFG, pos)
    for i, rec in enumerate(setup["trace"]["layers"]):
        p = _layer(setup["jp"], i)["attn"]
        x = jnp.asarray(rec["attn_in"], jnp.bfloat16)[None]
        err = _rel(attention.mla(p, x, cos, sin, CFG, positions=pos)[0][0], rec["attn_out"])
        err_bf16 = _rel(attention.mla(p, x, cos, sin, BF16_MODE, positions=pos)[0][0], rec["attn_out"])
        assert err <= 0.03, (i, err)
        assert err_bf16 > 2 * err, (i, err, err_bf16)


def test_logits_within_the_official_codes_own_noise(setup):
    """End to end (3 layers, 2 sequences of 96 tokens, top-k 32): the official code's prefill and decode
    paths differ from each other by FP8 / bf16 noise that routing and top-k flips amplify. dsjax's logits
    must be no farther from either official path than the two are from each other (within a 25% margin for
    other CPUs' rounding), and closer than the bf16 mode."""
    want_p, want_d = setup["prefill"], setup["decode"]
    own = _rel(want_d, want_p)
    got = np.asarray(dsjax.forward(setup["jp"], setup["tokens"], CFG))
    got_bf16 = np.asarray(dsjax.forward(setup["jp"], setup["tokens"], BF16_MODE))
    err = max(_rel(got, want_p), _rel(got, want_d))
    err_bf16 = min(_rel(got_bf16, want_p), _rel(got_bf16, want_d))
    assert err <= 1.25 * own, (err, own)
    assert err < err_bf16, (err, err_bf16)
