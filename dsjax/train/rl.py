"""The GRPO loop: rollouts from `dsjax.generate`, rewards, and the one training step (stage="grpo").

    result = rl.run(RLConfig(...), reward=rewards.exact_answer(), accuracy=rewards.exact_answer())

Each step: the next `prompts_per_step` prompts of a JSONL file (a grain pipeline: shuffled, repeated,
its position checkpointed) are rendered (V3.2 chat format by default), each sampled G times by the same
compiled prefill/decode as inference with `record=True` (the sampler's log-probs, kept vocabularies, MoE
routing and DSA keys), scored by the reward function on the decoded text, turned into group-relative
advantages, and trained on by `updates_per_rollout` optimizer steps of `step.compiled_step` (the replayed
forward: keep routing, keep the selection, keep the sampling mask). Every `eval_every` steps (and at the
start and the end) the policy answers the held-out prompts greedily and `accuracy` scores them.

Outputs under workdir, as trainer.run writes them: checkpoints/ (Orbax, async; state, prompt-iterator
position, settings), tensorboard/, metrics.jsonl (reward mean/std, train accuracy, held-out accuracy, KL,
clip fraction, masked sequences, completion length, timings) and grpo_curve.png. Rollout seeds are a
function of (seed, step), so `resume=True` continues bit-identically.

Prompt records: {"prompt": "text"} or {"messages": [{"role", "content"}, ...]} (the conversation so far,
rendered with the generation prompt), plus any fields the reward reads (e.g. "answer").
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

import checkpoints
from checkpoints import diskspace
from dsjax import lora as lora_lib
from dsjax import parallel as parallel_lib
from dsjax.config import Config
from dsjax.generate import generate, generate_with_stats
from dsjax.parallel import Parallelism
from dsjax.tokenizer import Tokenizer
from dsjax.train import checkpointing as ckpt_lib
from dsjax.train import data as data_lib
from dsjax.train import grpo as grpo_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import rewards as rewards_lib
from dsjax.train import step as step_lib
from dsjax.train import trainer


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """A GRPO run. `train` is the step's TrainConfig with stage="grpo" (its GRPOConfig holds G, ε, β, δ and
    the sampling temperature); `steps` counts rollout batches (each `updates_per_rollout` optimizer steps)."""

    train: step_lib.TrainConfig
    prompts: str  # JSONL of prompt records (see the module docstring)
    tokenizer: str | Tokenizer
    steps: int
    workdir: str
    init_ckpt: str | None = None  # the policy's start: a training run, a converted checkpoint or an HF dir
    model: Config | None = None  # a from-scratch policy (tests); None with init_ckpt
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prompts_per_step: int = 16
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = None  # rows hold this + max_new_tokens (a fixed plan); None: the longest
    top_k: int = 0  # the sampler's truncation (kept in training: GRPOConfig.keep_sampling_mask)
    top_p: float = 1.0
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (> 1: the clipped ratio matters)
    keep_routing: bool = True  # replay the rollout's MoE expert choices in training
    keep_selection: bool = True  # replay the rollout's DSA keys in training
    chat: bool = True  # render prompts in the V3.2 chat format (else BOS + the prompt text)
    eval_prompts: str | None = None  # JSONL of held-out prompt records (greedy answers, `accuracy`)
    eval_every: int = 50
    save_every: int = 50
    keep: int = 3
    resume: bool = False
    seed: int = 0
    parallel: Parallelism | None = None
    progress: bool = True

    def __post_init__(self):
        if self.train.stage != "grpo":
            raise ValueError(f"RLConfig.train must be a stage='grpo' TrainConfig, not stage={self.train.stage!r}.")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "updates_per_rollout", "eval_every",
                     "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        n = self.prompts_per_step * self.train.grpo.group_size
        if n % self.train.grad_accum:
            raise ValueError(f"prompts_per_step x group_size = {n} rollouts is not divisible into "
                             f"grad_accum={self.train.grad_accum} micro-batches.")


@dataclasses.dataclass
class RLResult:
    config: Config
    state: Any
    rows: list[dict[str, float]]  # metrics.jsonl rows of the whole run (step 0: the start's evaluation)
    step: int
    paths: dict[str, str]
    preempted: bool = False

    @property
    def accuracy(self) -> tuple[float | None, float | None]:
        """(held-out accuracy at the start, at the last evaluation)."""
        ev = [r["heldout_accuracy"] for r in self.rows if "heldout_accuracy" in r]
        return (ev[0], ev[-1]) if ev else (None, None)


# --------------------------------------------------------------------------------------------- prompts
def _check_prompt(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
        raise ValueError(f"{where}: a prompt record needs 'prompt' (text) or 'messages' (a list of "
                         "{'role', 'content'}).")
    return rec


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompt records of a JSONL file; a bad line is one ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist; pass a JSONL of {{'prompt': ..., 'answer': ...}}.")
    out = data_lib.read_jsonl(path, _check_prompt)
    if not out:
        raise ValueError(f"{path} holds no prompt records.")
    return out


def encode_prompt(tok: Tokenizer, rec: Mapping[str, Any], *, chat: bool = True) -> list[int]:
    """Token ids of a prompt record: its conversation with the (non-thinking) generation prompt, or
    BOS + its text."""
    if not chat:
        return tok.encode(rec["prompt"], add_bos=True)
    messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
    return tok.encode_chat(messages)


def prompt_text(rec: Mapping[str, Any]) -> str:
    return rec["prompt"] if "prompt" in rec else str(rec["messages"][-1].get("content", ""))


def prompt_iterator(n: int, batch: int, seed: int):
    """A grain iterator of int32 [batch] record indices: shuffled, reshuffled each epoch, checkpointable."""
    import grain

    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(batch)
    return ds.to_iter_dataset().__iter__()


# --------------------------------------------------------------------------------------------- rollouts
def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """A completion's text: special tokens (EOS) dropped."""
    return tok.decode(list(ids), skip_special_tokens=True)


def answer_accuracy(params: Any, config: Config, tok: Tokenizer, records: Sequence[Mapping[str, Any]],
                    accuracy: rewards_lib.RewardFn, *, max_new_tokens: int, chat: bool = True, batch: int = 256,
                    parallel: Parallelism | None = None, prompts: Sequence[list[int]] | None = None) -> float:
    """Mean `accuracy` of the greedy answers to `records` (held-out evaluation); prompts: their token ids
    when already encoded (`encode_prompt`)."""
    ids = [encode_prompt(tok, r, chat=chat) for r in records] if prompts is None else prompts
    scores = []
    for i in range(0, len(records), batch):
        recs = records[i:i + batch]
        out = generate(params, config, ids[i:i + batch], max_new_tokens=max_new_tokens, stop_tokens=(tok.eos_id,),
                       parallel=parallel)
        texts = [decode(tok, o) for o in out]
        scores.append(rewards_lib.score(accuracy, [prompt_text(r) for r in recs], texts, recs))
    return float(np.mean(np.concatenate(scores)))


def rollout(params: Any, config: Config, tok: Tokenizer, records: Sequence[Mapping[str, Any]],
            prompt_ids: Sequence[list[int]], rc: RLConfig, reward: rewards_lib.RewardFn,
            accuracy: rewards_lib.RewardFn | None, *, seed: int,
            length: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """G sampled completions of each record (prompt_ids: its tokens, `encode_prompt`) -> (the GRPO training
    batch [N, length] with advantages, host metrics: reward mean/std, groups with signal, train accuracy,
    completion length, rollout time)."""
    g = rc.train.grpo
    t0 = time.perf_counter()
    recs = [r for r in records for _ in range(g.group_size)]  # each prompt's G completions adjacent
    prompts = [p for p in prompt_ids for _ in range(g.group_size)]
    res = generate_with_stats(params, config, prompts, max_new_tokens=rc.max_new_tokens, temperature=g.temperature,
                              top_k=rc.top_k, top_p=rc.top_p, seed=seed, stop_tokens=(tok.eos_id,),
                              parallel=rc.parallel, record=True)
    texts = [decode(tok, t) for t in res.tokens]
    shown = [prompt_text(r) for r in recs]
    r = rewards_lib.score(reward, shown, texts, recs)
    batch = grpo_lib.rollout_batch(prompts, res, config, length=length, keep_routing=rc.keep_routing,
                                   keep_selection=rc.keep_selection)
    batch["advantages"] = np.asarray(grpo_lib.advantages(r, g.group_size, std_normalize=g.std_normalize))
    m = grpo_lib.group_stats(r, g.group_size)
    if accuracy is not None:
        m["accuracy"] = float(np.mean(rewards_lib.score(accuracy, shown, texts, recs)))
    m["completion_tokens"] = float(np.mean([len(t) for t in res.tokens]))
    m["rollout_s"] = time.perf_counter() - t0
    return batch, m


def row_length(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_prompt_tokens: int | None = None,
               where: str = "the prompt file") -> int:
    """One training row length for the whole run (one compile): max_prompt_tokens (default the longest
    prompt) + max_new_tokens - 1, rounded up to a multiple of 16. A longer prompt is one ValueError."""
    longest = max(len(p) for p in prompts)
    if max_prompt_tokens is not None and longest > max_prompt_tokens:
        i = next(i for i, p in enumerate(prompts) if len(p) > max_prompt_tokens)
        raise ValueError(f"prompt {i + 1} of {where} has {len(prompts[i])} tokens, over max_prompt_tokens="
                         f"{max_prompt_tokens}; shorten it or raise --max_prompt_tokens.")
    n = (longest if max_prompt_tokens is None else max_prompt_tokens) + max_new_tokens - 1
    return -(-n // 16) * 16


# --------------------------------------------------------------------------------------------- run
def _meta(config: Config, rc: RLConfig) -> dict[str, Any]:
    return {"config": config.to_dict(), "stage": "grpo", "train": dataclasses.asdict(rc.train),
            "lora": dataclasses.asdict(rc.train)["lora"],
            "rl": {k: getattr(rc, k) for k in ("prompts_per_step", "max_new_tokens", "max_prompt_tokens", "top_k", "top_p",
                                                "updates_per_rollout", "keep_routing", "keep_selection", "chat",
                                                "seed")},
            "data": trainer.data_fingerprint([rc.prompts]),
            # where the base came from: a LoRA run's checkpoints hold only adapters (checkpoints.load merges
            # them into this base, refusing one that has moved on), as trainer's do
            "init_ckpt": None if rc.init_ckpt is None else os.path.abspath(rc.init_ckpt), "seed": rc.seed,
            "init_step": None if rc.init_ckpt is None else checkpoints.describe(rc.init_ckpt).step}


def _check_resume(old: Mapping[str, Any], new: Mapping[str, Any], directory: str) -> None:
    """A resumed run must use the settings that wrote its checkpoints (else it is not the same run)."""
    new = json.loads(json.dumps(new))  # tuples -> lists, as stored
    diff = []
    for part in ("rl", "train", "config"):
        o, n = old.get(part, {}), new[part]
        diff += [f"{part}.{k}: {o.get(k)!r} -> {n[k]!r}" for k in n if o.get(k) != n[k]]
    for k in ("data", "init_ckpt", "init_step"):
        if old.get(k) != new[k]:
            diff.append(f"{k}: {old.get(k)!r} -> {new[k]!r}")
    if diff:
        raise ValueError(f"--resume: the checkpoint in {directory} was written with different settings "
                         f"({'; '.join(diff[:6])}); resume with the original flags or use a new --workdir.")


def plot_curve(rows: Sequence[Mapping[str, float]], path: str, title: str = "dsjax GRPO", window: int = 20) -> str:
    """Reward mean and train accuracy of the rollouts (each step faint, a `window`-step moving average bold)
    and the held-out accuracy (greedy) against step, as a PNG."""
    series = []
    for key, color in (("reward_mean", "tab:blue"), ("accuracy", "tab:orange")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if key == "accuracy" and pts == [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]:
            continue  # the reward is the accuracy: one line
        ys = np.asarray([y for _, y in pts])
        avg = [np.mean(ys[max(0, i + 1 - window):i + 1]) for i in range(len(ys))]
        series += [(None, pts, {"lw": 0.6, "alpha": 0.35, "color": color}),
                   (f"{key} (rollouts, {window}-step mean)", [(x, y) for (x, _), y in zip(pts, avg)],
                    {"lw": 1.4, "color": color})]
    series.append(("held-out accuracy (greedy)", [(r["step"], r["heldout_accuracy"]) for r in rows
                                                  if "heldout_accuracy" in r],
                   {"marker": "o", "lw": 1.6, "color": "black"}))
    return metrics_lib.plot_series(series, path, xlabel="GRPO step", ylabel="reward / accuracy", title=title)


def run(rc: RLConfig, reward: rewards_lib.RewardFn, accuracy: rewards_lib.RewardFn | None = None, *,
        on_step: Callable[[int, dict], None] | None = None) -> RLResult:
    """GRPO for rc.steps rollout batches (a resumed run continues up to that total)."""
    tc = rc.train
    tok = rc.tokenizer if isinstance(rc.tokenizer, Tokenizer) else Tokenizer.from_file(rc.tokenizer)
    if tok.eos_id is None:
        raise ValueError(f"the tokenizer has no EOS token ({tok.eos_token!r}): completions could not end.")
    records = read_prompts(rc.prompts)
    held = read_prompts(rc.eval_prompts) if rc.eval_prompts else []
    if held and accuracy is None:
        raise ValueError("eval_prompts needs an accuracy function (e.g. rewards.exact_answer()).")
    config, params = trainer.load_model(rc.init_ckpt, rc.model, rc.model_options, seed=rc.seed,
                                        parallel=rc.parallel)
    step_lib.check_stage(config, tc)
    parallel_lib.check(rc.parallel, config)
    ids = [encode_prompt(tok, r, chat=rc.chat) for r in records]  # tokenized once for the run
    held_ids = [encode_prompt(tok, r, chat=rc.chat) for r in held]
    length = row_length(ids, rc.max_new_tokens, rc.max_prompt_tokens, rc.prompts)
    if length > config.max_position_embeddings:
        raise ValueError(f"the longest prompt + max_new_tokens ({length} tokens) exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}; lower --max_new_tokens.")
    key = jax.random.key(rc.seed)
    adapters = None if tc.lora is None else lora_lib.init(config, tc.lora, jax.random.fold_in(key, 1))
    state = step_lib.init_state(params, config, tc, jax.random.fold_in(key, 2), adapters)
    state = trainer.place_state(state, config, rc.parallel)
    del params, adapters

    paths = {k: os.path.abspath(os.path.join(rc.workdir, v)) for k, v in (
        ("workdir", ""), ("checkpoints", "checkpoints"), ("tensorboard", "tensorboard"),
        ("metrics", "metrics.jsonl"), ("curve", "grpo_curve.png"))}
    os.makedirs(rc.workdir, exist_ok=True)
    diskspace.require_free(rc.workdir, sum(x.nbytes for x in jax.tree.leaves(trainer.to_save(state, tc)))
                           // jax.process_count(), "saving a checkpoint")
    it = prompt_iterator(len(records), rc.prompts_per_step, rc.seed)
    ck = ckpt_lib.TrainCheckpointer(paths["checkpoints"], save_every=rc.save_every, keep=rc.keep)
    meta = _meta(config, rc)
    latest = ck.latest_step()
    if (latest is None) == rc.resume:
        ck.close()
        raise ValueError(f"--resume: {paths['checkpoints']} holds no checkpoint to resume; drop --resume to start "
                         "a new run there." if rc.resume else
                         f"{paths['checkpoints']} already holds checkpoints (up to step {latest}); pass --resume to "
                         "continue that run, or choose a new --workdir.")
    if latest is not None:
        _check_resume(ck.read_meta(latest), meta, paths["checkpoints"])
        saved, _ = ck.restore(trainer.to_save(state, tc), it, latest)
        state = trainer.from_saved(state, saved, tc)
    start = int(state["step"]) // rc.updates_per_rollout

    step_fn = step_lib.compiled_step(config, tc, rc.parallel)
    policy_fn = (lambda s: s["params"]) if tc.lora is None else \
        jax.jit(lambda s: lora_lib.merge(s["params"], s["lora"], config, tc.lora))
    lead = jax.process_index() == 0
    writer = metrics_lib.ScalarWriter(paths["tensorboard"]) if lead else None
    log = metrics_lib.MetricsLog(paths["metrics"]) if lead else None

    def evaluate(step: int) -> dict[str, float]:
        if not held:
            return {}
        acc = answer_accuracy(policy_fn(state), config, tok, held, accuracy, max_new_tokens=rc.max_new_tokens,
                              chat=rc.chat, parallel=rc.parallel, prompts=held_ids)
        return {"heldout_accuracy": acc}

    def emit(step: int, scalars: dict[str, float]) -> None:
        if lead:
            log.write(step, scalars)
            writer.write(step, scalars)
        if on_step is not None:
            on_step(step, scalars)

    if start == 0 and held:
        emit(0, evaluate(0))
    preempted = False
    bar = tqdm(total=rc.steps, initial=start, desc="grpo", unit="step", dynamic_ncols=True) \
        if rc.progress and lead else None
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            for step in range(start, rc.steps):
                idx = np.asarray(next(it))
                host, scalars = rollout(policy_fn(state), config, tok, [records[i] for i in idx],
                                        [ids[i] for i in idx], rc, reward, accuracy,
                                        seed=rc.seed * 1_000_003 + step, length=length)
                batch = trainer.place_batch(_local_rows(host), rc.parallel)
                t0 = time.perf_counter()
                ms = []
                for _ in range(rc.updates_per_rollout):
                    state, m = step_fn(state, batch)
                    ms.append(jax.device_get(m))
                scalars["train_s"] = time.perf_counter() - t0
                for k in ("loss", "kl", "clip_fraction", "masked_sequences", "ratio_mean", "grad_norm", "lr"):
                    scalars[k] = float(np.mean([float(m[k]) for m in ms]))
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"step {step + 1}: the GRPO loss is {scalars['loss']}; lower the "
                                             "learning rate (the last checkpoint is intact).")
                if (step + 1) % rc.eval_every == 0 or step + 1 == rc.steps:
                    scalars.update(evaluate(step + 1))
                emit(step + 1, scalars)
                if bar is not None:
                    bar.set_postfix(reward=f"{scalars['reward_mean']:.3f}", **(
                        {"heldout": f"{scalars['heldout_accuracy']:.3f}"} if "heldout_accuracy" in scalars else {}))
                    bar.update(1)
                ck.check()
                ck.save(step + 1, trainer.to_save(state, tc), it, meta)
                if guard.requested:
                    preempted = True
                    ck.save(step + 1, trainer.to_save(state, tc), it, meta, force=True)
                    break
            done = int(state["step"]) // rc.updates_per_rollout
            ck.save(done, trainer.to_save(state, tc), it, meta, force=True)
            ck.wait()
    finally:
        for x in (bar, writer, log):
            if x is not None:
                x.close()
        ck.close()
    rows = metrics_lib.read_metrics(paths["metrics"])
    if lead and rows:
        plot_curve(rows, paths["curve"])
    return RLResult(config, state, rows, int(state["step"]) // rc.updates_per_rollout, paths, preempted)


def _local_rows(batch: Mapping[str, Any]) -> dict[str, Any]:
    """This process's share of a global host batch (every process builds the same rollouts)."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return dict(batch)
    rows = batch["tokens"].shape[0]
    if rows % n:
        raise ValueError(f"{rows} rollouts are not divisible over {n} processes.")
    k = rows // n
    return jax.tree.map(lambda v: v[p * k:(p + 1) * k], dict(batch))
