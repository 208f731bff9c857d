"""An emulation of DeepSeek's official V3.2 inference code (`inference/model.py` with the 2025-11-17 erratum,
and the semantics of its `act_quant` / `fp8_gemm` / `fp8_index` kernels), in numpy, written from the spec
(§2-§7) for the official-numerics tests. It shares no numerics code with dsjax: it reads dsjax's params tree
(matrices [in, out], FP8 leaves {qweight [.., in, out] e4m3, scale [.., in/128, out/128]}) and takes only the
YaRN frequency table from `dsjax.rope` (checked against HF elsewhere).

Rounding points, as the official code has them (bf16 activations throughout):
  * `linear`: an FP8 weight -> act_quant(x) (UE8M0, block 128) and a blockwise GEMM, per-block partial sums
    promoted to fp32 with both scales, one rounding to bf16 (§7.2-7.3); a bf16 weight -> bf16 matmul;
  * RMSNorm in fp32 with the fused fp32 residual (§2.2); the head in fp32;
  * MLA: the latent FP8 round trip (§4.6); prefill (S > 1) in the naive form with bf16 scores and softmax
    (§4.4), decode (S = 1) in the absorbed form with bf16 einsums (§4.5);
  * the indexer: half-split RoPE, Hadamard in bf16, FP8 q per (token, head) and k per token, integer-domain
    logits, w' = w·sq·Di^-1/2, key scale after the head sum, causal mask before the top-k (§5.3);
  * MoE: fp32 router, group-limited top-k, experts w2(bf16(silu(w1 x)·(w3 x))) accumulated in fp32 with the
    shared expert, one rounding (§6).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsjax.rope import inv_freq

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
F32 = np.float32


def bf16(x) -> np.ndarray:
    return np.asarray(x, F32).astype(BF16).astype(F32)


def is_fp8(w) -> bool:
    return isinstance(w, dict) and "qweight" in w


# ------------------------------------------------------------------------------------------ kernels
def act_quant(x, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """§7.2 on the last axis in blocks of `block` (one block if shorter): q (e4m3 values as f32)
    [..., nb, b] and UE8M0 scales f32 [..., nb]."""
    x = np.asarray(x, F32)
    d = x.shape[-1]
    b = min(block, d)
    xb = x.reshape(x.shape[:-1] + (d // b, b))
    amax = np.maximum(np.abs(xb).max(-1), F32(1e-4)).astype(F32)
    t = (amax * F32(1.0 / 448.0)).astype(F32)
    m, e = np.frexp(t)  # t = m·2^e with m in [0.5, 1): a power of two iff m == 0.5
    s = np.ldexp(F32(1.0), np.where(m == 0.5, e - 1, e)).astype(F32)
    q = np.clip(xb / s[..., None], -448, 448).astype(E4M3).astype(F32)
    return q, s


def fp8_roundtrip(x) -> np.ndarray:
    q, s = act_quant(bf16(x))
    return bf16((q * s[..., None]).reshape(np.shape(x)))


def fp8_gemm(x, w) -> np.ndarray:
    """y = Σ_kb (Σ_{k in kb} qx·qw)·sx[kb]·Sw[kb, n-block], fp32 accumulation, bf16 output. x [..., K]."""
    lead = np.shape(x)[:-1]
    qx, sx = act_quant(bf16(x).reshape(-1, np.shape(x)[-1]))  # [M, KB, b], [M, KB]
    qw = np.asarray(w["qweight"]).astype(F32)
    sw = np.asarray(w["scale"], F32)
    k, n = qw.shape
    kb, b = qx.shape[1:]
    part = np.einsum("mkb,kbn->mkn", qx.astype(np.float64), qw.reshape(kb, b, n).astype(np.float64)).astype(F32)
    sw_cols = np.repeat(sw, 128, axis=1)[:, :n][np.arange(kb) * b // 128]  # [KB, N]: the weight block of each
    y = np.zeros((qx.shape[0], n), F32)
    for j in range(kb):  # the fp32 accumulator over K blocks, in order
        y = (y + part[:, j] * sx[:, j:j + 1] * sw_cols[j]).astype(F32)
    return bf16(y).reshape(lead + (n,))


def linear(x, w, n_in: int = 1) -> np.ndarray:
    """The official `linear()`: FP8 weight -> fp8_gemm; bf16 weight [*in(n_in), *out] -> bf16 matmul."""
    if is_fp8(w):
        return fp8_gemm(x, w)
    w = np.asarray(w, F32)
    k = int(np.prod(w.shape[:n_in]))
    y = bf16(x).reshape(-1, k) @ bf16(w).reshape(k, -1)
    return bf16(y).reshape(np.shape(x)[:-1] + (-1,))


def dequant(w, n_in: int, shape) -> np.ndarray:
    """A weight as bf16 values in its logical shape (the absorbed path's dequantised kv_b)."""
    if is_fp8(w):
        q = np.asarray(w["qweight"]).astype(F32)
        s = np.repeat(np.repeat(np.asarray(w["scale"], F32), 128, 0), 128, 1)[:q.shape[0], :q.shape[1]]
        return bf16(q * s).reshape(shape)
    return bf16(w).reshape(shape)


def rms_norm(x, w, eps) -> np.ndarray:
    x = np.asarray(x, F32)
    return bf16(np.asarray(w, F32) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + F32(eps)))


def add_rms_norm(x, resid, w, eps):
    s = (np.asarray(x, F32) + (0 if resid is None else np.asarray(resid, F32))).astype(F32)
    return rms_norm(s, w, eps), bf16(s)


def layer_norm(x, g, b, eps=1e-6) -> np.ndarray:
    x = np.asarray(x, F32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return bf16((x - mu) / np.sqrt(var + F32(eps)) * np.asarray(g, F32) + np.asarray(b, F32))


def hadamard(x) -> np.ndarray:
    d = np.shape(x)[-1]
    h = np.array([[1.0]], F32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return bf16((np.asarray(x, F32) @ h.T) * F32(d ** -0.5))


def rope(x, pos, cfg, interleaved: bool) -> np.ndarray:
    """Rotate x [S, ..., dr] at positions pos [S] in fp32, one rounding (interleaved: MLA; half-split: indexer)."""
    ang = np.asarray(pos, F32)[:, None] * inv_freq(cfg)[None]  # [S, dr/2]
    c, s = np.cos(ang), np.sin(ang)
    shape = (len(pos),) + (1,) * (np.ndim(x) - 2) + (c.shape[-1],)
    c, s = c.reshape(shape), s.reshape(shape)
    x = np.asarray(x, F32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return bf16(np.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(x.shape))
    h = x.shape[-1] // 2
    return bf16(np.concatenate([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1))


def softmax_bf16(scores) -> np.ndarray:
    """torch.softmax on a bf16 tensor: computed in fp32, output rounded to bf16."""
    z = np.asarray(scores, F32)
    z = np.exp(z - z.max(-1, keepdims=True))
    return bf16(z / z.sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------ layers
def indexer_keys(p, x, pos, cfg):
    """kI8 (e4m3 values) [S, Di] and sk [S] of new tokens x [S, D] (what the index cache stores)."""
    dr = cfg.qk_rope_head_dim
    k = layer_norm(linear(x, p["wk"]), p["k_norm_scale"], p["k_norm_bias"])
    k = np.concatenate([rope(k[:, :dr], pos, cfg, False), k[:, dr:]], -1)
    q8, s = act_quant(hadamard(k), block=k.shape[-1])
    return q8[:, 0], s[:, 0]


def indexer_scores(p, x, cq, pos, k8, sk, cfg) -> np.ndarray:
    """I [S, T] of new tokens (x [S, D], cq [S, q_lora]) over cached keys (k8 [T, Di], sk [T]) (§5.3)."""
    hi, di, dr = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    q = linear(cq, p["wq_b"]).reshape(len(pos), hi, di)
    q = np.concatenate([rope(q[..., :dr], pos, cfg, False), q[..., dr:]], -1)
    q8, sq = act_quant(hadamard(q), block=di)  # [S, Hi, 1, Di], [S, Hi, 1]
    w = (np.asarray(x, F32) @ np.asarray(p["weights_proj"], F32)) * F32(hi ** -0.5)
    w = (w * sq[..., 0] * F32(di ** -0.5)).astype(F32)  # [S, Hi]
    logits = np.einsum("shd,td->sht", q8[:, :, 0].astype(np.float64), k8.astype(np.float64)).astype(F32)
    return (sk[None] * np.einsum("sht,sh->st", np.maximum(logits, 0), w)).astype(F32)


def topk_mask(scores, pos, n_keys: int, topk: int) -> np.ndarray:
    """Bool [S, T]: the top-min(k, T) causal keys per query (ties to the lower index, as XLA's top_k)."""
    causal = np.arange(n_keys)[None] <= np.asarray(pos)[:, None]
    s = np.where(causal, scores, -np.inf)
    k = min(topk, n_keys)
    order = np.argsort(-s, axis=-1, kind="stable")[:, :k]
    mask = np.zeros_like(causal)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask & causal


def mla(p, x, pos, cache, cfg):
    """One MLA + DSA layer on new tokens x [S, D] at positions pos; `cache` (a dict, updated in place) holds
    c [T, r], k_pe [T, dr], k8 [T, Di], sk [T]. Prefill (cache empty, S > 1): naive form; else absorbed."""
    h, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    s_new = len(pos)
    cq = rms_norm(linear(x, p["wq_a"]), p["q_norm"], cfg.rms_norm_eps)
    q = linear(cq, p["wq_b"]).reshape(s_new, h, dn + dr)
    q_nope, q_pe = q[..., :dn], rope(q[..., dn:], pos, cfg, True)
    kv = linear(x, p["wkv_a"])
    c = fp8_roundtrip(rms_norm(kv[:, :r], p["kv_norm"], cfg.rms_norm_eps))
    k_pe = rope(kv[:, r:], pos, cfg, True)
    k8, sk = indexer_keys(p["indexer"], x, pos, cfg)
    prefill = not cache and s_new > 1
    for name, v in (("c", c), ("k_pe", k_pe), ("k8", k8), ("sk", sk)):
        cache[name] = v if name not in cache else np.concatenate([cache[name], v], 0)
    t = len(cache["c"])
    scores_i = indexer_scores(p["indexer"], x, cq, pos, cache["k8"], cache["sk"], cfg)
    allowed = topk_mask(scores_i, pos, t, cfg.index_topk)
    scale = F32(cfg.softmax_scale)
    if prefill:  # naive: expand K / V per head through the FP8 kv_b GEMM
        kvb = linear(c, p["wkv_b"]).reshape(t, h, dn + dv)
        k = np.concatenate([kvb[..., :dn], np.broadcast_to(k_pe[:, None], (t, h, dr))], -1)
        qf = np.concatenate([q_nope, q_pe], -1)
        sc = bf16(bf16(np.einsum("shd,thd->sht", qf, k)) * scale)
        sc = np.where(allowed[:, None], sc, -np.inf)
        o = bf16(np.einsum("sht,thd->shd", softmax_bf16(sc), kvb[..., dn:]))
    else:  # absorbed: W_UK into the query, W_UV after the latent sum
        w = dequant(p["wkv_b"], 1, (r, h, dn + dv))
        q_abs = bf16(np.einsum("shd,rhd->shr", q_nope, w[..., :dn]))
        sc = bf16(bf16(np.einsum("shr,tr->sht", q_abs, cache["c"])) + bf16(np.einsum("shd,td->sht", q_pe,
                                                                                         cache["k_pe"])))
        sc = np.where(allowed[:, None], bf16(sc * scale), -np.inf)
        o_lat = bf16(np.einsum("sht,tr->shr", softmax_bf16(sc), cache["c"]))
        o = bf16(np.einsum("shr,rhv->shv", o_lat, w[..., dn:]))
    return linear(o.reshape(s_new, h * dv), p["wo"], n_in=2), allowed, cq


def mlp(p, x) -> np.ndarray:
    """SwiGLU as the official MLP / Expert: w2(bf16(silu(fp32 w1 x) · fp32 w3 x))."""
    g, u = linear(x, p["gate"]), linear(x, p["up"])
    return linear(bf16(g / (1 + np.exp(-g)) * u), p["down"])


def route(p, x, cfg):
    """(expert ids [N, k], weights [N, k]) from the fp32 router (§6.2)."""
    s = 1 / (1 + np.exp(-(np.asarray(x, F32) @ np.asarray(p["router"], F32))))
    e, g = cfg.n_routed_experts, cfg.n_group
    sb = s + np.asarray(p["bias"], F32)
    if g > 1:
        grp = np.sort(sb.reshape(len(x), g, e // g), -1)[..., -2:].sum(-1)
        keep = np.argsort(-grp, -1, kind="stable")[:, :cfg.topk_group]
        gmask = np.zeros((len(x), g), bool)
        np.put_along_axis(gmask, keep, True, -1)
        sb = np.where(np.repeat(gmask, e // g, 1), sb, -np.inf)
    ids = np.argsort(-sb, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(s, ids, -1)
    w = w / w.sum(-1, keepdims=True) if cfg.norm_topk_prob else w
    return ids, (w * F32(cfg.routed_scaling_factor)).astype(F32)


def moe(p, x, cfg) -> np.ndarray:
    ids, w = route(p, x, cfg)
    y = np.zeros(np.shape(x), F32)
    for ex in range(cfg.n_routed_experts):  # increasing expert id, as the official loop
        rows, slot = np.nonzero(ids == ex)
        if len(rows):
            ep = {k: _index(v, ex) for k, v in p["experts"].items()}
            y[rows] += w[rows, slot][:, None] * mlp(ep, x[rows])
    if "shared" in p:
        y += mlp(p["shared"], x)
    return bf16(y)


def _index(w, i):
    return {k: np.asarray(v)[i] for k, v in w.items()} if is_fp8(w) else np.asarray(w)[i]


def layer_params(params, i: int, cfg):
    """Layer i's params (stacked leaves indexed) and whether it is an MoE layer."""
    stack, j = ("dense", i) if i < cfg.n_dense_layers else ("moe", i - cfg.n_dense_layers)
    return _tree_index(params[stack], j), stack == "moe"


def _tree_index(tree, i):
    if is_fp8(tree):
        return {k: np.asarray(v)[i] for k, v in tree.items()}
    if isinstance(tree, dict):
        return {k: _tree_index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


class Model:
    """The official forward with a KV cache: `forward(tokens)` runs new tokens at the next positions (the
    first call with S > 1 is the naive prefill; later calls decode), returning fp32 logits [S, V]."""

    def __init__(self, params, cfg):
        self.p, self.cfg = params, cfg
        self.layers = [layer_params(params, i, cfg) for i in range(cfg.num_hidden_layers)]
        self.caches = [{} for _ in self.layers]
        self.pos = 0
        self.trace: list[dict] = []  # per call: every layer's inputs / outputs (for the per-layer tests)

    def forward(self, tokens) -> np.ndarray:
        cfg = self.cfg
        pos = np.arange(self.pos, self.pos + len(tokens))
        self.pos += len(tokens)
        x, resid = bf16(np.asarray(self.p["embed"], F32)[np.asarray(tokens)]), None
        rec = []
        for (lp, is_moe), cache in zip(self.layers, self.caches):
            block_in = (x, resid)
            a_in, resid = add_rms_norm(x, resid, lp["attn_norm"], cfg.rms_norm_eps)
            a, allowed, cq = mla(lp["attn"], a_in, pos, cache, cfg)
            f_in, resid = add_rms_norm(a, resid, lp["mlp_norm"], cfg.rms_norm_eps)
            x = moe(lp["moe"], f_in, cfg) if is_moe else mlp(lp["mlp"], f_in)
            rec.append({"block_in": block_in, "attn_in": a_in, "cq": cq, "attn_out": a, "ffn_in": f_in, "ffn_out": x, "allowed": allowed})
        self.trace.append({"pos": pos, "layers": rec})
        h = np.asarray(add_rms_norm(x, resid, self.p["final_norm"], cfg.rms_norm_eps)[0], F32)
        return (h @ np.asarray(self.p["lm_head"], F32)).astype(F32)
