"""GRPO as DeepSeek V3.2 uses it (spec §10.5): group-relative advantages, the token-level clipped objective,
the importance-corrected (unbiased) k3 KL to the reference policy, off-policy sequence masking, and the
sampler's truncation mask kept for the training log-probs.

Notation: a prompt q, its G sampled completions o_1..o_G with rewards R_i; π_old is the policy that sampled
(its probabilities are what the sampler actually used: tempered and truncated), π_θ the policy trained,
π_ref the reference (with LoRA: the base with the adapters off).

    Â_i      = R_i − mean(R_1..R_G)                      (÷ std(R) only with std_normalize; V3.2 drops it)
    r_{i,t}  = π_θ(o_{i,t}) / π_old(o_{i,t})
    KL_{i,t} = r_{i,t} · (π_ref/π_θ − log(π_ref/π_θ) − 1)   (every π at token o_{i,t}: unbiased under π_old)
    M_i      = 0 if Â_i < 0 and mean_t log(π_old/π_θ) > δ, else 1
    J        = 1/N · Σ_i M_i · 1/|o_i| · Σ_t [min(r Â_i, clip(r, 1−ε, 1+ε) Â_i) − β·KL_{i,t}]

The functions are pure and shape-polymorphic. The training forward that feeds them replays the rollout's
MoE routing and DSA keys (`batch["selection"]`, `dsjax.train.step.selection`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import attention, model, sampling
from dsjax.config import Config
from dsjax.parallel import Parallelism
from dsjax.train import losses


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The static settings of the GRPO objective (spec §10.5)."""

    group_size: int = 8  # G completions per prompt
    clip_eps: float = 0.2  # ε of the clipped ratio
    kl_beta: float = 0.0  # β of the KL penalty (0: no reference forward needed)
    std_normalize: bool = False  # divide advantages by the group's std (GRPO's original; V3.2 does not)
    offpolicy_delta: float | None = None  # δ of off-policy sequence masking; None: keep every sequence
    keep_sampling_mask: bool = True  # π_θ on the sampler's truncated vocabulary (same action space as π_old)
    temperature: float = 1.0  # the sampler's: π_θ is tempered the same way

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs at least 2 completions per prompt.")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"clip_eps={self.clip_eps}: must be in (0, 1).")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta={self.kl_beta}: must be >= 0.")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: rollouts are sampled, so it must be > 0.")
        if self.offpolicy_delta is not None and self.offpolicy_delta < 0:
            raise ValueError(f"offpolicy_delta={self.offpolicy_delta}: must be >= 0 (or None: off).")


# ------------------------------------------------------------------------------------ advantages
def advantages(rewards: jax.Array, group_size: int, *, std_normalize: bool = False,
               eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages. rewards f32 [N] (N = prompts · G, each prompt's G completions adjacent)
    -> f32 [N]: R_i − mean of its group (÷ (std + eps) with std_normalize)."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards are not whole groups of {group_size}.")
    g = r.reshape(-1, group_size)
    a = g - jnp.mean(g, axis=1, keepdims=True)
    if std_normalize:
        a = a / (jnp.std(g, axis=1, keepdims=True) + eps)
    return a.reshape(-1)


# ------------------------------------------------------------------------------------ sampling masks
def sampling_mask(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """The vocabulary the sampler draws from: bool [..., V] (`dsjax.sampling.truncate` of the tempered
    logits, exactly as `dsjax.generate` samples). logits f32 [..., V]."""
    return sampling.sampling_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k) > -jnp.inf


pack_mask, unpack_mask = sampling.pack_mask, sampling.unpack_mask  # a rollout's masks, as bits


def token_logprobs(logits: jax.Array, tokens: jax.Array, *, temperature: float = 1.0,
                   mask: jax.Array | None = None) -> jax.Array:
    """log π(token) under the tempered softmax of logits f32 [B, T, V], renormalised over `mask` (bool
    [B, T, V], the sampler's kept vocabulary: keep-sampling-mask) when given. tokens int [B, T] -> f32 [B, T].
    A token outside its mask gets -inf (it cannot have been sampled)."""
    scaled = logits.astype(jnp.float32) / jnp.float32(temperature)
    if mask is not None:
        scaled = jnp.where(mask, scaled, -jnp.inf)
    logz = jax.nn.logsumexp(scaled, axis=-1)
    return jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0] - logz


def policy_logprobs(params: Mapping, batch: Mapping[str, jax.Array], config: Config, *, temperature: float,
                    keep_sampling_mask: bool = True, parallel: Parallelism | None = None,
                    chunk_bytes: int | None = None, remat: str | None = None) -> jax.Array:
    """log π_θ of each target token of a rollout batch (`rollout_batch`) -> f32 [N, T] (0 off the completion).

    The forward replays batch["selection"] when present (keep routing / keep the DSA selection); with
    keep_sampling_mask the softmax is over each token's recorded kept vocabulary, so π_θ and the sampler's
    π_old share one action space. chunk_bytes bounds the f32 logits held at once (as `head_cross_entropy`:
    strided position chunks in a rematerialised scan, the kept-vocabulary bits unpacked per chunk), so long
    completions never hold [N, T, V]; None forms them whole. remat: the layer scan's rematerialisation
    policy (`model.remat_policy`), as in the other training stages.
    """
    aux = model.forward_hidden(params, batch["tokens"], config, positions=batch["positions"],
                               segment_ids=batch["segment_ids"], selection=batch.get("selection"),
                               remat=remat, parallel=parallel)
    head = params["lm_head"]
    vocab = head.shape[-1]
    completion = batch["completion"] > 0
    bits = batch["mask_bits"] if keep_sampling_mask else None

    def logprobs(h, targets, done, words):
        logits = model.lm_head(params, h)
        mask = None
        if words is not None:  # prompt and padding positions keep the whole vocabulary: no all -inf row, no NaN
            mask = sampling.unpack_mask(words, vocab) | (~done)[..., None]
        return jnp.where(done, token_logprobs(logits, targets, temperature=temperature, mask=mask), 0.0)

    n_rows, length = batch["targets"].shape
    n = 1 if chunk_bytes is None else losses.ce_chunks(n_rows, length, vocab, chunk_bytes)
    if n == 1:
        return logprobs(aux.hidden, batch["targets"], completion, bits)

    @jax.checkpoint
    def chunk(_, xs):
        return None, logprobs(*xs)

    split = functools.partial(losses.strided_chunks, n=n)
    xs = (split(aux.hidden), split(batch["targets"]), split(completion), None if bits is None else split(bits))
    _, lp = jax.lax.scan(chunk, None, xs)  # [n, N, T/n]
    return jnp.moveaxis(lp, 0, 2).reshape(n_rows, length)


# ------------------------------------------------------------------------------------ objective
def unbiased_kl(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token importance-corrected k3: (π_θ/π_old)·(π_ref/π_θ − log(π_ref/π_θ) − 1), all at the sampled
    token. Its expectation under π_old is KL(π_θ ‖ π_ref) exactly, and so is its gradient's."""
    ratio = jnp.exp(logp - old_logp)
    d = ref_logp - logp
    return ratio * (jnp.exp(d) - d - 1.0)


def sequence_mask(adv: jax.Array, logp: jax.Array, old_logp: jax.Array, token_mask: jax.Array,
                  delta: float | None) -> jax.Array:
    """Off-policy sequence masking M_i (f32 [N]): 0 for a negative-advantage sequence whose mean
    log(π_old/π_θ) over its tokens exceeds δ; 1 otherwise (positive sequences are always kept)."""
    if delta is None:
        return jnp.ones_like(adv)
    n = jnp.maximum(jnp.sum(token_mask, axis=-1), 1.0)
    divergence = jnp.sum((old_logp - logp) * token_mask, axis=-1) / n
    return jnp.where((adv < 0) & (divergence > delta), 0.0, 1.0)


def objective(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, token_mask: jax.Array, cfg: GRPOConfig,
              ref_logp: jax.Array | None = None) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The GRPO loss −J (f32 []) and its metrics. logp, old_logp, ref_logp f32 [N, T] at the sampled tokens
    (π_θ, the sampler's π_old, π_ref); adv f32 [N]; token_mask f32 [N, T] (1 on completion tokens: no loss on
    prompt or padding). Gradients flow through logp only."""
    old_logp = jax.lax.stop_gradient(old_logp)
    tm = token_mask.astype(jnp.float32)
    lp = jnp.where(tm > 0, logp, 0.0)  # padding may hold -inf (masked vocabularies): keep it out of exp
    ol = jnp.where(tm > 0, old_logp, 0.0)
    ratio = jnp.exp(lp - ol)
    a = adv[:, None]
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    per_token = jnp.minimum(ratio * a, clipped * a)
    kl = jnp.zeros_like(per_token)
    if cfg.kl_beta:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs the reference policy's log-probs (ref_logp).")
        kl = unbiased_kl(lp, ol, jnp.where(tm > 0, jax.lax.stop_gradient(ref_logp), 0.0))
        per_token = per_token - cfg.kl_beta * kl
    m = jax.lax.stop_gradient(sequence_mask(adv, lp, ol, tm, cfg.offpolicy_delta))
    n_tok = jnp.maximum(jnp.sum(tm, axis=-1), 1.0)
    per_seq = jnp.sum(per_token * tm, axis=-1) / n_tok
    loss = -jnp.mean(m * per_seq)
    total = jnp.maximum(jnp.sum(tm), 1.0)
    metrics = {
        "kl": jnp.sum(kl * tm) / total,
        "clip_fraction": jnp.sum((jnp.abs(ratio - 1.0) > cfg.clip_eps) * tm) / total,
        "masked_sequences": 1.0 - jnp.mean(m),
        "ratio_mean": jnp.sum(ratio * tm) / total,
    }
    return loss, metrics


def group_stats(rewards: np.ndarray, group_size: int) -> dict[str, float]:
    """Host-side reward summary of a rollout batch: mean, std and the share of groups with any spread
    (a group whose rewards are all equal has zero advantage: it teaches nothing)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "groups_with_signal": float(np.mean(r.std(axis=1) > 0))}


# ------------------------------------------------------------------------------------ rollouts -> batch
def rollout_batch(prompts: list[list[int]], result, config, *, length: int | None = None,
                  keep_routing: bool = True, keep_selection: bool = True) -> dict[str, np.ndarray]:
    """A recorded rollout (`dsjax.generate_with_stats(..., record=True)`) as a training batch [N, T].

    Row i = prompt i then its completion but the last token (the inputs the sampler fed), right-padded to
    T (`length`, default the longest). Returns tokens, targets (the next token), positions, segment_ids
    (1 real, 0 padding), completion f32 [N, T] (1 where the target is a completion token: the loss's
    tokens), old_logprob f32 [N, T] (the sampler's log π_old of that target), mask_bits uint32 [N, T, W]
    (its kept vocabulary) and, with keep_routing / keep_selection, selection: the rollout's MoE routing
    and DSA keys to replay (`batch["selection"]`; keys only where training attention is sparse too, i.e.
    T > index_topk: below, both attend every causal key). Padding rows replay key 0 and experts 0..k-1.
    """
    rows = [list(p) + list(t[:-1]) for p, t in zip(prompts, result.tokens)]
    t_len = max(len(r) for r in rows) if length is None else length
    if any(len(r) > t_len for r in rows):
        raise ValueError(f"a rollout row of {max(len(r) for r in rows)} tokens exceeds length={t_len}.")
    n = len(rows)
    words = result.record[0]["masks"].shape[-1]
    out = {"tokens": np.zeros((n, t_len), np.int32), "targets": np.zeros((n, t_len), np.int32),
           "positions": np.zeros((n, t_len), np.int32), "segment_ids": np.zeros((n, t_len), np.int32),
           "completion": np.zeros((n, t_len), np.float32), "old_logprob": np.zeros((n, t_len), np.float32),
           "mask_bits": np.zeros((n, t_len, words), np.uint32)}
    sparse = attention.is_sparse(config, t_len)
    keys = [k for k in result.record[0]["selection"]
            if (keep_routing and k.endswith("_experts")) or (keep_selection and sparse and not k.endswith("_experts"))]
    sel = {}
    for k in keys:
        tail = result.record[0]["selection"][k].shape[1:]
        fill = np.arange(tail[-1], dtype=np.int32) if k.endswith("_experts") else \
            np.where(np.arange(tail[-1]) == 0, 0, -1).astype(np.int32)
        sel[k] = np.broadcast_to(fill, (n, t_len) + tail).copy()
    for i, (p, toks, rec) in enumerate(zip(prompts, result.tokens, result.record)):
        r = rows[i]
        m, c = len(r), len(toks)
        out["tokens"][i, :m] = r
        out["targets"][i, :m] = (list(p) + list(toks))[1:]
        out["positions"][i, :m] = np.arange(m)
        out["segment_ids"][i, :m] = 1
        out["completion"][i, len(p) - 1:m] = 1.0  # targets p .. p + c - 1: the completion tokens
        out["old_logprob"][i, len(p) - 1:m] = rec["logprobs"][:c]
        out["mask_bits"][i, len(p) - 1:m] = rec["masks"][:c]
        for k in keys:
            sel[k][i, :m] = rec["selection"][k][:m]
    if sel:
        out["selection"] = sel
    return out
