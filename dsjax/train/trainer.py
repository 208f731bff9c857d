"""The training loop shared by `experiments/finetune.py` and `experiments/quickstart.py`.

    run(RunConfig) -> RunResult

It builds the model (from a preset config, a converted / HF checkpoint, or an earlier training run), the
grain data iterator and the train state; resumes from WORKDIR/checkpoints when asked; then steps with a
tqdm bar (loss, tokens/s), logging every term to TensorBoard (WORKDIR/tensorboard) and metrics.jsonl,
saving asynchronously every `save_every` steps (keeping `keep`), and on SIGTERM saving at the current step
before returning. At the end it writes WORKDIR/loss_curve.png and, if asked, exports HF safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import checkpoints
from checkpoints import diskspace, export as export_mod
from dsjax import parallel as parallel_lib
from dsjax.config import Config
from dsjax.parallel import Parallelism
from dsjax.params import init_params
from dsjax.train import checkpointing as ckpt_lib
from dsjax.train import data as data_lib
from dsjax import lora as lora_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run. `model` is the architecture for a from-scratch run (None with init_ckpt, whose
    config is used); `model_options` then sets dsjax runtime options on it (dtype, param_dtype, backends)."""

    train: step_lib.TrainConfig
    data: data_lib.DataConfig
    tokenizer: str | Any  # path to tokenizer.json, or a tokenizer object
    steps: int
    workdir: str
    model: Config | None = None
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_ckpt: str | None = None
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    seed: int = 0
    parallel: Parallelism | None = None  # the layout (e.g. sharding.MeshParallelism(mesh)); None = one device
    export_hf: str | None = None
    progress: bool = True
    time_limit_s: float | None = None  # stop (and save) after the step that crosses this budget (from run())


@dataclasses.dataclass
class RunResult:
    config: Config
    state: Any
    rows: list[dict[str, float]]  # metrics.jsonl rows of the whole run (earlier segments included)
    step: int
    preempted: bool
    paths: dict[str, str]
    stopped_early: bool = False  # the time limit ended the run before rc.steps


# --------------------------------------------------------------------------------------------- model init
def _exporter() -> Callable:
    """`export(params, config, out_dir, workdir)`: params -> a dsjax checkpoint (`checkpoints.save`, kept as
    WORKDIR/final_params) -> HF safetensors (`checkpoints.export`)."""
    def export(params: Any, config: Config, out_dir: str, workdir: str) -> str:
        final = os.path.join(workdir, "final_params")
        checkpoints.save(final, params, config, overwrite=True)
        export_mod.export(final, out_dir, progress=jax.process_index() == 0)
        return final

    return export


def load_initial(rc: RunConfig) -> tuple[Config, Any]:
    """(config, params) from rc.init_ckpt (training run, converted Orbax checkpoint, or HF directory) or
    fresh random params for rc.model."""
    return load_model(rc.init_ckpt, rc.model, rc.model_options, seed=rc.seed, parallel=rc.parallel)


def load_model(path: str | None, model: Config | None, options: Mapping[str, Any], *, seed: int = 0,
               parallel: Parallelism | None = None) -> tuple[Config, Any]:
    """(config, params) from a checkpoint `path` (training run, converted Orbax checkpoint, or HF directory;
    `model`, when also given, must describe it) or fresh random params for `model`; `options` set dsjax
    runtime options (dtype, param_dtype, backends, index_topk) on the config."""
    opts = dict(options)
    if path is None:
        if model is None:
            raise ValueError("give a model config (--config=tiny, ...) or a checkpoint (--init_ckpt=DIR).")
        config = model.replace(**opts) if opts else model
        return config, init_params(config, jax.random.key(seed))
    # a training run (e.g. stage 2 starting from the indexer warm-up; LoRA adapters merged), a converted
    # checkpoint or an HF directory: checkpoints.load tells them apart, and says what it found otherwise
    config, params = checkpoints.load(path, parallel=parallel, dtype=opts.get("param_dtype"))
    config = config.replace(**opts)
    if model is not None:  # --config / --vocab_size given too: they must describe the checkpoint's model
        want, got = model.replace(**opts).to_hf(), config.to_hf()
        diff = [f"{k}: {want[k]!r} (given) vs {got.get(k)!r} (checkpoint)" for k in want if want[k] != got.get(k)]
        if diff:
            raise ValueError(f"the model config given (--config / --vocab_size) is not the one of --init_ckpt={path} "
                             f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); drop them: the checkpoint "
                             "decides the architecture.")
    return config, params


def to_save(state: Mapping[str, Any], tc: step_lib.TrainConfig) -> dict[str, Any]:
    """What a checkpoint holds: the whole state, except that a LoRA run keeps, of the base params, only the
    leaves it changes (`step.changed_params`; none in sft): a 671B base is not rewritten at every save."""
    if tc.lora is None:
        return dict(state)
    out = {k: v for k, v in state.items() if k != "params"}
    changed = step_lib.changed_params(state["params"], tc)
    if changed:
        out["params_trained"] = changed
    return out


def from_saved(state: Mapping[str, Any], saved: Mapping[str, Any], tc: step_lib.TrainConfig) -> dict[str, Any]:
    """Inverse of `_to_save`, given the run's fresh state (whose params hold the base)."""
    if tc.lora is None:
        return dict(saved)
    out = dict(saved)
    changed = out.pop("params_trained", {})
    out["params"] = step_lib.combine({"params": state["params"]}, {"params": changed})["params"]
    return out


# --------------------------------------------------------------------------------------------- placement
def place_state(state: Any, config: Config, parallel: Parallelism | None) -> Any:
    """Put the train state on the layout: params by its rules, optimizer moments like their params,
    everything else (step, RNG, counts, LoRA adapters) replicated."""
    if parallel is None:
        return state
    params = parallel.place_params(state["params"], config)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {tuple(str(k.key) for k in kp): x.sharding for kp, x in flat}
    by_shape = {tuple(str(k.key) for k in kp): x.shape for kp, x in flat}
    replicated = parallel.sharding(())

    def one(kp, x):
        # An optimizer moment's path is (opt_state, <optax nesting>, "params", <the param's path>).
        names = tuple(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        s = by_path.get(names[names.index("params") + 1:]) if "params" in names else None
        return jax.device_put(x, s if s is not None and x.shape == by_shape[names[names.index("params") + 1:]]
                              else replicated)

    rest = {k: v for k, v in state.items() if k != "params"}
    return {**jax.tree_util.tree_map_with_path(one, rest), "params": params}


def place_batch(batch: Mapping[str, np.ndarray], parallel: Parallelism | None) -> dict[str, jax.Array]:
    """Host batch -> device arrays; on a layout sharded over the data axes (each process gives its rows).
    Every leaf is [B, L, ...] (a replayed `selection` too), split like the tokens."""
    if parallel is None:
        return jax.tree.map(jnp.asarray, dict(batch))

    def put(v):
        shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        s = parallel.sharding(parallel_lib.TOKENS + (None,) * (v.ndim - 2), shape)
        return jax.device_put(v, s) if jax.process_count() == 1 else \
            jax.make_array_from_process_local_data(s, v, shape)

    return jax.tree.map(put, dict(batch))


# --------------------------------------------------------------------------------------------- run
def data_fingerprint(paths: Any) -> list[dict[str, Any]]:
    """Path, size and a content hash (first and last MiB) of each data file: a resumed run must read the
    same data, or its data position means nothing."""
    out = []
    for p in paths:
        size = os.path.getsize(p)
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
        out.append({"path": os.path.abspath(p), "size": size, "sha256_ends": h.hexdigest()})
    return out


def _meta(config: Config, rc: RunConfig) -> dict[str, Any]:
    tc = rc.train
    train = dataclasses.asdict(tc)
    return {"config": config.to_dict(), "stage": tc.stage, "train": train,
            "lora": train["lora"], "seq_len": rc.data.seq_len, "batch_size": rc.data.batch_size,
            "data_seed": rc.data.seed, "packing": rc.data.packing, "data": data_fingerprint(rc.data.paths),
            "tokenizer": os.path.abspath(rc.tokenizer) if isinstance(rc.tokenizer, str) else None,
            # where the base params came from: a LoRA run's checkpoints reload them from here
            "init_ckpt": None if rc.init_ckpt is None else os.path.abspath(rc.init_ckpt), "seed": rc.seed,
            "init_step": None if rc.init_ckpt is None else checkpoints.describe(rc.init_ckpt).step}


def _check_resume(meta: Mapping[str, Any], now: Mapping[str, Any], directory: str) -> None:
    """A resumed run must use the settings that wrote the checkpoint (else it is not the same run)."""
    keys = ("seq_len", "batch_size", "data_seed", "packing") + (("init_ckpt", "init_step", "seed") if now["lora"]
                                                                 else ())
    diff = [f"{k}: {meta.get(k)!r} -> {now[k]!r}" for k in keys if meta.get(k) != now[k]]
    if "data" in meta and meta["data"] != now["data"]:  # (checkpoints from before it was recorded: not checked)
        old, new = ([f"{d['path']} ({d['size']} B)" for d in m] for m in (meta["data"], now["data"]))
        diff.append(f"data: {old} -> {new}" if old != new else "data: the files' contents changed")
    for part in ("train", "config"):
        old, new = meta.get(part, {}), json.loads(json.dumps(now[part]))  # tuples -> lists, as stored
        diff += [f"{part}.{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diff:
        hint = (" (the lr schedule spans --steps unless --schedule_steps is set: to extend a run keep "
                "--schedule_steps at its original length)" if any(d.startswith("train.optim") for d in diff) else "")
        raise ValueError(f"--resume: the checkpoint in {directory} was written with different settings "
                         f"({'; '.join(diff)}); resume with the original flags or use a new --workdir{hint}.")


def validate(config: Config, rc: RunConfig) -> None:
    """Every flag / config problem we can see before spending time on data or compilation."""
    if rc.steps < 1:
        raise ValueError(f"steps={rc.steps} must be >= 1.")
    if rc.data.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={rc.data.seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; lower --seq_len.")
    if rc.data.batch_size % rc.train.grad_accum:
        raise ValueError(f"batch_size={rc.data.batch_size} must be a multiple of grad_accum={rc.train.grad_accum}.")
    step_lib.check_stage(config, rc.train)
    if rc.train.stage == "sparse" and rc.data.seq_len <= config.index_topk:
        raise ValueError(f"stage=sparse with seq_len={rc.data.seq_len} <= index_topk={config.index_topk}: DSA "
                         "never prunes; use longer rows or --stage=sft.")
    if rc.export_hf:
        if os.path.exists(rc.export_hf):
            raise ValueError(f"--export_hf={rc.export_hf!r} already exists; choose a new directory (nothing is "
                             "overwritten).")
    parallel_lib.check(rc.parallel, config)


def run(rc: RunConfig, *, on_step: Callable[[int, dict], None] | None = None,
        stop_when: Callable[[int, Any], bool] | None = None) -> RunResult:
    """Train for rc.steps optimizer steps (continuing a resumed run up to that total).
    on_step(step, scalars) sees each step's metrics; stop_when(step, state) returning True ends the run
    there (saved; RunResult.stopped_early), e.g. once a model reaches a target accuracy."""
    t_start = time.perf_counter()  # the time limit covers set-up and compilation too
    if rc.init_ckpt is None and rc.model is not None:  # fail fast, before initialising parameters
        validate(rc.model.replace(**rc.model_options), rc)
    config, params = load_initial(rc)
    validate(config, rc)
    tokenizer = data_lib.load_tokenizer(rc.tokenizer) if isinstance(rc.tokenizer, str) else rc.tokenizer
    it = data_lib.make_iterator(rc.data, tokenizer, vocab_size=config.vocab_size)
    tc = rc.train
    adapters = None if tc.lora is None else lora_lib.init(config, tc.lora, jax.random.fold_in(jax.random.key(rc.seed), 1))
    state = step_lib.init_state(params, config, tc, jax.random.fold_in(jax.random.key(rc.seed), 2), adapters)
    state = place_state(state, config, rc.parallel)
    del params, adapters

    os.makedirs(rc.workdir, exist_ok=True)
    paths = {"workdir": os.path.abspath(rc.workdir),
             "checkpoints": os.path.abspath(os.path.join(rc.workdir, "checkpoints")),
             "tensorboard": os.path.abspath(os.path.join(rc.workdir, "tensorboard")),
             "metrics": os.path.abspath(os.path.join(rc.workdir, "metrics.jsonl")),
             "loss_curve": os.path.abspath(os.path.join(rc.workdir, "loss_curve.png"))}
    # a checkpoint must fit before anything is compiled (each save checks again)
    diskspace.require_free(rc.workdir, sum(x.nbytes for x in jax.tree.leaves(to_save(state, tc)))
                           // jax.process_count(), "saving a checkpoint")
    ck = ckpt_lib.TrainCheckpointer(paths["checkpoints"], save_every=rc.save_every, keep=rc.keep)
    meta = _meta(config, rc)
    latest = ck.latest_step()
    if latest is None and rc.resume:
        ck.close()
        raise ValueError(f"--resume: {paths['checkpoints']} holds no checkpoint to resume (a mistyped --workdir?); "
                         "drop --resume to start a new run there.")
    if latest is not None and not rc.resume:
        ck.close()
        raise ValueError(f"{paths['checkpoints']} already holds checkpoints (up to step {latest}); pass --resume to "
                         "continue that run, or choose a new --workdir.")
    if latest is not None:
        _check_resume(ck.read_meta(latest), meta, paths["checkpoints"])
        saved, _ = ck.restore(to_save(state, tc), it, latest)
        state = from_saved(state, saved, tc)
    start = int(state["step"])

    step_fn = step_lib.compiled_step(config, tc, rc.parallel)
    writer = metrics_lib.ScalarWriter(paths["tensorboard"]) if jax.process_index() == 0 else None
    log = metrics_lib.MetricsLog(paths["metrics"]) if jax.process_index() == 0 else None
    preempted = stopped = False
    bar = None
    if rc.progress and jax.process_index() == 0:
        bar = tqdm(total=rc.steps, initial=start, desc=f"{tc.stage}", unit="step", dynamic_ncols=True)
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            t_last = time.perf_counter()
            for step in range(start, rc.steps):
                host_batch = data_lib.next_batch(it, rc.data)
                n_tokens = int((host_batch["segment_ids"] > 0).sum()) * jax.process_count()
                state, m = step_fn(state, place_batch(host_batch, rc.parallel))
                scalars = metrics_lib.flatten_metrics(jax.device_get(m))
                now = time.perf_counter()
                scalars["tokens_per_s"] = n_tokens / max(now - t_last, 1e-9)
                t_last = now
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"step {step + 1}: loss is {scalars['loss']}; lower the learning rate "
                                             "or check the data (the last checkpoint is intact).")
                if log is not None:
                    log.write(step + 1, scalars)
                    writer.write(step + 1, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:.0f}")
                    bar.update(1)
                if on_step is not None:
                    on_step(step + 1, scalars)
                ck.check()  # a failed async save stops the run here
                ck.save(step + 1, to_save(state, tc), it, meta)
                if guard.requested:
                    preempted = True
                    ck.save(step + 1, to_save(state, tc), it, meta, force=True)
                    break
                if step + 1 < rc.steps and ((rc.time_limit_s is not None and now - t_start > rc.time_limit_s)
                                            or (stop_when is not None and stop_when(step + 1, state))):
                    stopped = True
                    break
            final = int(state["step"])
            ck.save(final, to_save(state, tc), it, meta, force=True)
            ck.wait()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if log is not None:
            log.close()
        ck.close()
    rows = metrics_lib.read_metrics(paths["metrics"])
    if jax.process_index() == 0 and rows:
        metrics_lib.plot_loss_curve(rows, paths["loss_curve"], title=f"dsjax {tc.stage}")
    if rc.export_hf and not preempted:
        params = state["params"] if tc.lora is None else lora_lib.merge(state["params"], state["lora"], config, tc.lora)
        paths["final_params"] = os.path.abspath(_exporter()(params, config, rc.export_hf, rc.workdir))
        paths["export_hf"] = os.path.abspath(rc.export_hf)
    return RunResult(config, state, rows, int(state["step"]), preempted, paths, stopped)


def summary(res: RunResult) -> str:
    """Where everything is, for the end of a script."""
    lines = [f"{'preempted at' if res.preempted else 'finished'} step {res.step}"]
    for k in ("checkpoints", "tensorboard", "metrics", "loss_curve", "final_params", "export_hf"):
        if k in res.paths:
            lines.append(f"  {k:12s} {res.paths[k]}")
    return "\n".join(lines)

