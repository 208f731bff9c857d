"""The training step: losses, gradient accumulation, AdamW, and the router-bias update, in one jitted call.

    state = {"step": int32 [], "params": params, ["lora": adapters,] "opt_state": optax state, "rng": uint32 [2]}
    batch = data.py's dict of [B, L] arrays (B = all micro-batches of one optimizer step)

Objective per stage (spec §8.2, §6.3, §10):
    sft             CE + λ·MTP + α·balance                       (all params but the router biases; or LoRA)
    indexer_warmup  KL(main attention ‖ indexer), dense attention  (only the lightning indexers train)
    sparse          CE + λ·MTP + α·balance + KL on the selected keys (DSA on; indexer inputs detached)
    grpo            −J of GRPO on a recorded rollout batch (`dsjax.train.grpo`: its routing and DSA keys
                    replayed, π_θ over the sampler's kept vocabulary; the reference = the base without
                    LoRA adapters). Indexers and router biases stay as they are.

Only the trainable leaves are differentiated and given optimizer state; frozen leaves are passed through
untouched (bit-identical). The MoE correction biases are never trained by gradient: after each step they
move by ±γ against the batch's expert load (spec §6.3). Token losses are normalised by the token count
of the whole global batch, so accumulating micro-batch gradients gives exactly the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dsjax import model, mtp as mtp_lib
from dsjax.config import Config
from dsjax.parallel import Parallelism
from dsjax import lora as lora_lib
from dsjax.train import grpo as grpo_lib
from dsjax.train.losses import balance_loss, bias_update, head_cross_entropy, load_imbalance, mtp_targets
from dsjax.train.schedule import OptimConfig, lr_schedule, make_optimizer

STAGES = ("sft", "indexer_warmup", "sparse", "grpo")
_INDEXER_LOSS = {"indexer_warmup": "dense_warmup", "sparse": "sparse"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything static about a training step (hashable: one compile per distinct value)."""

    stage: str = "sft"
    optim: OptimConfig = OptimConfig()
    grad_accum: int = 1  # micro-batches per optimizer step
    remat: str | None = "full"  # jax.checkpoint policy of the scanned layers (model.remat_policy)
    mtp_weight: float = 0.1  # λ
    balance_alpha: float = 1e-4  # α
    bias_update_rate: float = 1e-3  # γ (0 = off)
    indexer_loss_weight: float = 1.0
    lora: lora_lib.LoraConfig | None = None
    # f32 logits the loss holds at once per device ([B, L, vocab] is computed in chunks of positions of at
    # most this size; losses.head_cross_entropy). None = all at once.
    ce_chunk_bytes: int | None = 1 << 30
    grpo: grpo_lib.GRPOConfig | None = None  # the objective's settings (stage="grpo" only)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is unknown; use one of {STAGES}.")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1.")
        if self.ce_chunk_bytes is not None and self.ce_chunk_bytes <= 0:
            raise ValueError(f"ce_chunk_bytes={self.ce_chunk_bytes} must be positive (or None: no chunking).")
        if self.remat is not None:
            model.remat_policy(self.remat)  # raises a clear error for unknown names
        if (self.stage == "grpo") != (self.grpo is not None):
            raise ValueError("stage=grpo takes its objective's settings in TrainConfig.grpo (a GRPOConfig), and "
                             "only stage=grpo does.")
        if self.grpo is not None and self.grpo.kl_beta and self.lora is None:
            raise ValueError("a KL penalty (kl_beta > 0) needs LoRA: the reference policy is the base model with "
                             "the adapters off. Set --lora_rank or kl_beta=0.")
        if self.stage == "indexer_warmup" and self.lora is not None:
            raise ValueError("LoRA does not apply to stage=indexer_warmup (only the indexer trains there); "
                             "drop --lora_rank or use --stage=sft|sparse.")


# ------------------------------------------------------------------------------------------ trainable leaves
def _path_names(kp) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def _is_router_bias(names: tuple[str, ...]) -> bool:
    return len(names) >= 2 and names[-1] == "bias" and names[-2] == "moe"


def is_trainable(names: tuple[str, ...], tc: TrainConfig) -> bool:
    """Whether the leaf at path `names` (in {"params": ..., "lora": ...}) is trained in this stage."""
    if names[0] == "lora":
        return True
    if _is_router_bias(names):
        return False  # moved by the bias update, never by the optimizer
    if "indexer" in names:  # the indexer learns only from its KL loss (spec §10): not in sft or RL
        return tc.stage in ("indexer_warmup", "sparse")  # the main layers' and the MTP block's indexers alike
    if tc.stage == "indexer_warmup":
        return False
    return tc.lora is None  # LoRA: the base stays frozen


def _flat(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(_path_names(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _subset(tree: Any, keep: Callable[[tuple[str, ...], Any], bool]) -> dict[str, Any]:
    """A nested dict shaped like `tree` holding only the leaves for which keep(path names, leaf)."""
    out: dict[str, Any] = {}
    for names, x in _flat(tree):
        if keep(names, x):
            node = out
            for k in names[:-1]:
                node = node.setdefault(k, {})
            node[names[-1]] = x
    return out


def _check_trainable_dtype(names: tuple[str, ...], x: Any) -> bool:
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 2:
        raise ValueError(f"{'.'.join(names)} is stored as {x.dtype} (FP8 checkpoint?) and cannot be trained "
                         "directly; load the checkpoint dequantised or train LoRA adapters (--lora_rank).")
    return True


def trainable(variables: Mapping[str, Any], tc: TrainConfig) -> dict[str, Any]:
    """The trained leaves: a nested dict shaped like `variables` ({"params": ..., "lora": ...}) holding only
    the leaves this stage trains (the optimizer's tree; its moments mirror the params' paths)."""
    out = _subset(variables, lambda names, x: is_trainable(names, tc) and _check_trainable_dtype(names, x))
    if not out:
        raise ValueError(f"stage={tc.stage} trains no parameter of this model (e.g. indexer_warmup on a model "
                         "without the lightning indexer).")
    return out


def changed_params(params: Mapping[str, Any], tc: TrainConfig) -> dict[str, Any]:
    """The base-param leaves a LoRA run changes (a nested dict; empty in sft, the indexers in the DSA stages).
    A LoRA run's checkpoints hold only these and the adapters: the frozen rest is reloaded from its start."""
    if tc.lora is None:
        raise ValueError("changed_params is for LoRA runs (TrainConfig.lora); a full run changes every weight.")
    return _subset({"params": params}, lambda names, _: is_trainable(names, tc)).get("params", {})


def combine(variables: Mapping[str, Any], train: Mapping[str, Any]) -> Any:
    """`variables` with the leaves present in `train` (same paths) replaced."""
    new = dict(_flat(train))
    return jax.tree_util.tree_map_with_path(lambda kp, x: new.get(_path_names(kp), x), variables)


# ------------------------------------------------------------------------------------------ state
def check_stage(config: Config, tc: TrainConfig) -> None:
    """Clear errors for a stage this model or this build cannot run."""
    if tc.stage in ("sft", "grpo"):
        return
    if not config.has_indexer:
        raise ValueError(f"stage={tc.stage} trains the DSA lightning indexer, but model_type={config.model_type!r} "
                         "has none; use a V3.2 model or --stage=sft.")


def init_state(params: Any, config: Config, tc: TrainConfig, rng: jax.Array,
               adapters: Any | None = None) -> dict[str, Any]:
    """A fresh training state. adapters: LoRA adapters (`lora.init`) when tc.lora is set.

    The state holds `params` itself (no copy) and the compiled step donates its state argument, so the
    arrays passed in are consumed by the first step; pass a copy to keep using them.
    """
    check_stage(config, tc)
    if (adapters is None) != (tc.lora is None):
        raise ValueError("pass LoRA adapters exactly when TrainConfig.lora is set.")
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters}
    opt_state = make_optimizer(tc.optim).init(trainable(variables, tc))
    state = {"step": jnp.zeros((), jnp.int32), **variables, "opt_state": opt_state,
             "rng": jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng}
    return jax.tree.map(_commit, state)


def _commit(x: jax.Array) -> jax.Array:
    """Commit a single-device array to its device (no copy). Restored checkpoints are committed, and jit
    compiles separately for committed and uncommitted inputs: committing here keeps one compile per run."""
    x = jnp.asarray(x)
    return jax.device_put(x, x.sharding) if len(x.sharding.device_set) == 1 else x


# ------------------------------------------------------------------------------------------ loss
def _runs_mtp(params: Mapping[str, Any], tc: TrainConfig) -> tuple[bool, bool]:
    """(MTP cross-entropy, MTP indexer KL): whether the step runs the MTP block, and for which."""
    mtp_ce = bool(tc.mtp_weight) and "mtp" in params and tc.stage != "indexer_warmup"
    mtp_kl = "mtp" in params and tc.stage != "sft"  # the MTP block's own indexer trains in the DSA stages
    return mtp_ce, mtp_kl


def _forwards(params: Mapping[str, Any], mb: Mapping[str, Any], config: Config, tc: TrainConfig,
              parallel: Parallelism | None, record: bool = False):
    """The step's forward passes: (model Aux, (MTP hidden, MTP MoE stats, MTP indexer loss, MTP keys) or
    Nones). mb["selection"], when present, replays the sparse attention pattern (`selection`)."""
    tokens, seg, pos = mb["tokens"], mb["segment_ids"], mb["positions"]
    kw = {"indexer_loss": _INDEXER_LOSS[tc.stage]} if tc.stage != "sft" else {}
    sel = dict(mb.get("selection") or {})
    mtp_sel, mtp_ex = sel.pop("mtp", None), sel.pop("mtp_experts", None)
    aux = model.forward_hidden(params, tokens, config, positions=pos, segment_ids=seg, remat=tc.remat,
                               selection=sel or None, record_selection=record, parallel=parallel, **kw)
    mtp = (None, None, None, None)
    if any(_runs_mtp(params, tc)):
        next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        mtp = mtp_lib.mtp_train_forward(params, aux.hidden, next_tokens, config, positions=pos, segment_ids=seg,
                                        selection=mtp_sel, experts=mtp_ex, parallel=parallel, **kw)
    elif mtp_sel is not None or mtp_ex is not None:
        raise ValueError("selection has 'mtp' entries but this step does not run the MTP block.")
    return aux, mtp


def selection(params: Mapping[str, Any], batch: Mapping[str, jax.Array], config: Config, tc: TrainConfig,
              parallel: Parallelism | None = None) -> dict[str, jax.Array]:
    """The discrete choices of the step's forward for this batch, as `batch["selection"]` takes them: keys
    of every DSA layer {"dense" / "moe": int32 [B, L, n_layers, K], "mtp": [B, L, K]} (sparse layers only)
    and MoE routing {"moe_experts": [B, L, n_moe, k], "mtp_experts": [B, L, k]}. With it in the batch, a
    later step attends the same keys and routes to the same experts whatever its indexer and router would
    now pick: on another layout or after an update (RL's keep-routing and keep-the-selection; exact
    comparisons across summation orders, which flip near ties). Pure; jit it. No LoRA adapters applied."""
    aux, (_, stats, _, mtp_idx) = _forwards(params, batch, config, tc, parallel, record=True)
    out = dict(aux.selection)
    if mtp_idx is not None:
        out["mtp"] = mtp_idx
    if stats is not None:
        out["mtp_experts"] = stats.experts
    return out


def _loss(train: Mapping[str, jax.Array], variables: Mapping[str, Any], mb: Mapping[str, jax.Array],
          denom: Mapping[str, jax.Array], config: Config, tc: TrainConfig, parallel: Parallelism | None = None):
    """Objective of one micro-batch, already divided by the global normalisers -> (loss, (terms, loads)).
    parallel: the run's layout (expert-parallel MoE, context-parallel attention); None = one device."""
    devices = 1 if parallel is None else parallel.mesh.size
    v = combine(variables, train)
    params = v["params"] if tc.lora is None else lora_lib.apply(v["params"], v["lora"], config, tc.lora)
    if tc.stage == "grpo":
        return _grpo_loss(params, v["params"], mb, config, tc, parallel)
    seg = mb["segment_ids"]
    # the logits are split over every mesh axis (batch, sequence, vocab over tensor): bound the global chunk
    chunk = None if tc.ce_chunk_bytes is None else tc.ce_chunk_bytes * devices
    aux, (h, stats, mtp_iloss, _) = _forwards(params, mb, config, tc, parallel)
    ce_sum, _ = head_cross_entropy(aux.hidden, params["lm_head"], mb["targets"], mb["weights"],
                                   chunk_bytes=chunk)
    terms = {"ce": ce_sum / denom["tokens"]}
    loads = {}
    if config.n_moe_layers:
        terms["balance"] = balance_loss(aux.moe_load, aux.moe_score) / tc.grad_accum
        loads["moe"] = jnp.mean(aux.moe_load, axis=1)  # [L_moe, E]
    mtp_ce, mtp_kl = _runs_mtp(params, tc)
    if mtp_kl:
        terms["mtp_indexer_kl"] = mtp_iloss / tc.grad_accum
    if mtp_ce:
        t2, w2 = mtp_targets(mb["targets"], mb["weights"], seg)
        terms["mtp"] = head_cross_entropy(h, params["lm_head"], t2, w2, chunk_bytes=chunk)[0] \
            / denom["mtp_tokens"]
        if stats is not None:
            terms["balance"] = terms.get("balance", 0.0) + balance_loss(stats.load[None], stats.mean_score[None]) \
                / tc.grad_accum
            loads["mtp"] = jnp.mean(stats.load, axis=0)  # [E]
    if tc.stage != "sft":
        terms["indexer_kl"] = aux.indexer_loss / tc.grad_accum
    # Each indexer learns only from its KL (its inputs are detached): the weight sets the indexers' step size.
    kl = tc.indexer_loss_weight * (terms.get("indexer_kl", 0.0) + terms.get("mtp_indexer_kl", 0.0))
    if tc.stage == "indexer_warmup":
        total = kl
    else:
        total = terms["ce"] + tc.mtp_weight * terms.get("mtp", 0.0) + tc.balance_alpha * terms.get("balance", 0.0) + kl
    return total, (terms, loads)


def _grpo_loss(params, base, mb, config: Config, tc: TrainConfig, parallel: Parallelism | None):
    """−J of one micro-batch of a rollout batch (`grpo.rollout_batch` + "advantages" [N]), as a share of
    the global batch (÷ grad_accum: sequences weigh the same in every micro-batch)."""
    g = tc.grpo
    devices = 1 if parallel is None else parallel.mesh.size  # the logits are split over the mesh (as in _loss)
    kw = dict(temperature=g.temperature, keep_sampling_mask=g.keep_sampling_mask, parallel=parallel, remat=tc.remat,
              chunk_bytes=None if tc.ce_chunk_bytes is None else tc.ce_chunk_bytes * devices)
    lp = grpo_lib.policy_logprobs(params, mb, config, **kw)
    ref = grpo_lib.policy_logprobs(base, mb, config, **kw) if g.kl_beta else None  # adapters off
    loss, metrics = grpo_lib.objective(lp, mb["old_logprob"], mb["advantages"], mb["completion"], g, ref_logp=ref)
    return loss / tc.grad_accum, ({"grpo_loss": loss / tc.grad_accum,
                                   **{k: v / tc.grad_accum for k, v in metrics.items()}}, {})


def _microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    b = batch["tokens"].shape[0]
    if b % n:
        raise ValueError(f"batch of {b} rows is not divisible into grad_accum={n} micro-batches.")
    return jax.tree.map(lambda v: v.reshape((n, b // n) + v.shape[1:]), dict(batch))


def train_step(state: Mapping[str, Any], batch: Mapping[str, jax.Array], *, config: Config,
               tc: TrainConfig, parallel: Parallelism | None = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimizer step over a global batch [B, L] (pure; `compiled_step` jits it).
    parallel: the run's layout (`dsjax.parallel`), None = one device."""
    optimizer = make_optimizer(tc.optim)
    variables = {k: state[k] for k in ("params", "lora") if k in state}
    train = trainable(variables, tc)
    weights = batch["completion"] if tc.stage == "grpo" else batch["weights"]
    denom = {"tokens": jnp.maximum(jnp.sum(weights), 1.0)}
    _, w2 = mtp_targets(batch["targets"], weights, batch["segment_ids"])
    denom["mtp_tokens"] = jnp.maximum(jnp.sum(w2), 1.0)
    grad_fn = jax.value_and_grad(functools.partial(_loss, config=config, tc=tc, parallel=parallel), has_aux=True)
    mbs = _microbatches(batch, tc.grad_accum)

    def body(acc, mb):
        (loss, (terms, loads)), g = grad_fn(train, variables, mb, denom)
        return jax.tree.map(jnp.add, acc, g), (loss, terms, loads)

    zeros = jax.tree.map(jnp.zeros_like, train)
    grads, (loss, terms, loads) = jax.lax.scan(body, zeros, mbs)
    # Per-micro-batch values are already normalised to the global batch: sum them; loads are means.
    loss = jnp.sum(loss)
    terms = jax.tree.map(jnp.sum, terms)
    loads = jax.tree.map(lambda x: jnp.mean(x, axis=0), loads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], train)
    new_vars = combine(variables, optax.apply_updates(train, updates))
    params = new_vars["params"]
    if tc.bias_update_rate and tc.lora is None and tc.stage not in ("indexer_warmup", "grpo"):
        params = _update_biases(params, loads, tc.bias_update_rate)
    new_state = {**state, **new_vars, "params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])}
    metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
               "lr": lr_schedule(tc.optim)(state["step"]), "tokens": jnp.sum(weights)}
    if "moe" in loads:
        metrics["moe_load"] = loads["moe"]
        metrics["moe_imbalance"] = load_imbalance(loads["moe"])
    return new_state, metrics


def _update_biases(params: Mapping[str, Any], loads: Mapping[str, jax.Array], rate: float) -> dict:
    """Aux-loss-free balancing of every MoE layer's correction bias (main stack and MTP block)."""
    params = dict(params)
    if "moe" in loads:
        stack = dict(params["moe"])
        stack["moe"] = {**stack["moe"], "bias": bias_update(stack["moe"]["bias"], loads["moe"], rate)}
        params["moe"] = stack
    if "mtp" in loads:
        blk = dict(params["mtp"]["block"])
        blk["moe"] = {**blk["moe"], "bias": bias_update(blk["moe"]["bias"], loads["mtp"], rate)}
        params["mtp"] = {**params["mtp"], "block": blk}
    return params


@functools.lru_cache(maxsize=16)
def compiled_step(config: Config, tc: TrainConfig, parallel: Parallelism | None = None) -> Callable:
    """The jitted step for (config, tc, parallel), cached so every trainer / test with the same settings
    shares one compile. The state argument is donated. With a layout, place the state with
    `trainer.place_state` and the batch with `trainer.place_batch`; the new state keeps the input state's
    shardings."""
    fn = functools.partial(train_step, config=config, tc=tc, parallel=parallel)
    if parallel is None:
        return jax.jit(fn, donate_argnums=(0,))
    cache: dict[Any, Callable] = {}

    def call(state, batch):
        shardings = jax.tree.map(lambda x: x.sharding, state)
        key = jax.tree.structure(state)
        if key not in cache:
            cache[key] = jax.jit(fn, donate_argnums=(0,), out_shardings=(shardings, None))
        return cache[key](state, batch)

    return call
