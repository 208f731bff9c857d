"""One notion of "a dsjax model on disk", shared by `checkpoints.load`, `checkpoints.export`, `generate.py
--ckpt_dir` and `finetune.py --init_ckpt`. A directory is one of:

    converted   a dsjax (Orbax) checkpoint: `python -m checkpoints.convert` or `checkpoints.save`
                (marker file dsjax_checkpoint.json)
    training    a training run: its workdir, its `checkpoints/` directory (latest step, or `step=`), or one
                step directory `checkpoints/<step>`. Full runs store the params; LoRA runs store the adapters
                (+ the base leaves the stage trains) and reload their frozen base from the run's own start
                (its --init_ckpt, or the seed), then merge.
    hf          an HF transformers directory (config.json + *.safetensors)

`resolve` names the kind (and the step); anything else is one `CheckpointError` that says what was found
and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from checkpoints import integrity, orbax_io
from checkpoints.hf_load import load_hf
from checkpoints.restore import config_from_marker, load_converted
from checkpoints.safetensors_io import CheckpointError
from dsjax import lora as lora_lib, parallel as parallel_lib
from dsjax.config import Config
from dsjax.parallel import Parallelism
from dsjax.params import ParamSpec, init_params, param_dtype, param_specs

KINDS = ("converted", "training", "hf")
_TRAIN_ITEMS = ("state", "meta")


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A resolved model directory. `path`: what is read (the converted / HF directory, or a run's
    checkpoints directory); `step`: the training step (training only); `tokenizer`: a tokenizer.json that
    belongs to it, when known."""

    kind: str
    path: str
    step: int | None = None
    tokenizer: str | None = None


def _train_steps(d: str) -> list[int]:
    """Finished TrainCheckpointer steps under `d` (unfinished saves live under temporary names)."""
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                  and all(os.path.isdir(os.path.join(d, n, item)) for item in _TRAIN_ITEMS))


def _training(path: str, step: int | None) -> ModelDir | None:
    base = os.path.basename(os.path.normpath(path))
    parent = os.path.dirname(os.path.normpath(path))
    if base.isdigit() and int(base) in _train_steps(parent):  # checkpoints/<step>
        if step is not None and step != int(base):
            raise CheckpointError(f"{path} is step {base} of a training run, but step={step} was asked for.")
        path, step = parent, int(base)
    for d in (path, os.path.join(path, "checkpoints")):  # the checkpoints dir, or the run's workdir
        steps = _train_steps(d)
        if steps:
            if step is not None and step not in steps:
                raise CheckpointError(f"{d} is a training run without step {step}; it has steps {steps}.")
            step = steps[-1] if step is None else step
            tok = read_meta(d, step).get("tokenizer")
            return ModelDir("training", d, step, tok if isinstance(tok, str) and os.path.isfile(tok) else None)
    return None


def resolve(path: str | os.PathLike, step: int | None = None) -> ModelDir:
    """The kind of model directory at `path` (see the module docstring); CheckpointError otherwise."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path) and os.path.isdir(orbax_io.partial_dir(path)):
        raise CheckpointError(f"{path}: its write was interrupted (only {orbax_io.partial_dir(path)} exists); rerun "
                              "the command that wrote it (convert resumes where it stopped).")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a converted checkpoint, a training run (its "
                              "workdir or checkpoints/ directory) or an HF directory.")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; pass the directory of a model (converted checkpoint, training "
                              "run or HF directory).")
    if os.path.isfile(os.path.join(path, orbax_io.MARKER)):
        tok = os.path.join(path, orbax_io.ASSETS, "tokenizer.json")
        return _only_latest(ModelDir("converted", path, None, tok if os.path.isfile(tok) else None), step)
    if os.path.isfile(os.path.join(path, "config.json")):
        tok = os.path.join(path, "tokenizer.json")
        return _only_latest(ModelDir("hf", path, None, tok if os.path.isfile(tok) else None), step)
    found = _training(path, step)
    if found is not None:
        return found
    if os.path.basename(path).endswith(orbax_io.PARTIAL):
        raise CheckpointError(f"{path} is an unfinished write; rerun the command that wrote it, then pass the "
                              f"directory without {orbax_io.PARTIAL}.")
    listing = sorted(os.listdir(path))[:8]
    raise CheckpointError(f"{path} is not a dsjax model: no {orbax_io.MARKER} (converted checkpoint), no "
                          f"finished training step (a run's checkpoints/<step>/state), no config.json (HF); it "
                          f"holds {listing or 'nothing'}. Pass one of those, e.g. WORKDIR/checkpoints of a "
                          "finetune.py / quickstart run.")


def _only_latest(md: ModelDir, step: int | None) -> ModelDir:
    if step is not None:
        raise CheckpointError(f"{md.path} is a {md.kind} checkpoint with one set of weights; step={step} "
                              "applies only to a training run's checkpoints.")
    return md


def read_config(path: str | os.PathLike, step: int | None = None) -> Config:
    """The model Config of any dsjax model on disk, from its metadata alone (no weights read)."""
    md = resolve(path, step)
    if md.kind == "converted":
        return config_from_marker(orbax_io.read_marker(md.path, check_files=False))
    if md.kind == "hf":
        return Config.from_hf(md.path)
    return Config.from_dict(read_meta(md.path, md.step)["config"])


def read_meta(train_dir: str, step: int) -> dict[str, Any]:
    """The metadata JSON a training step recorded (config, stage, LoRA settings, where the run started)."""
    with open(os.path.join(train_dir, str(step), "meta", "metadata"), encoding="utf-8") as f:
        return json.load(f)


_WEIGHTS = ("params/", "params_trained/", "lora/")  # the state leaves a model is made of


def _read_state(train_dir: str, step: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    """A training step's saved state (plain tree); its weights checked against the checksums saved with them."""
    state_dir = os.path.join(train_dir, str(step), "state")
    with orbax_io.storage_errors(state_dir), ocp.StandardCheckpointer() as ck:
        state = ck.restore(state_dir)
    weights = {n: x for n, x in integrity.by_name(state).items() if n.startswith(_WEIGHTS)}
    bad = integrity.first_mismatch(meta.get("checksums", {}), weights)
    if bad:
        raise CheckpointError(f"{state_dir} is damaged: array {bad} does not match the checksum written with it. "
                              "Pass an earlier step (checkpoints/<step>) or re-train from an intact one.")
    return state


def _combine(tree: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with the leaves present in the nested dict `part` replaced."""
    out = dict(tree)
    for k, v in part.items():
        out[k] = _combine(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _training_params(md: ModelDir) -> tuple[Config, Any]:
    meta = read_meta(md.path, md.step)
    config = Config.from_dict(meta["config"])
    state = _read_state(md.path, md.step, meta)
    params = state.get("params")
    if params is None:  # a LoRA run's checkpoint: its frozen base comes from where that run started
        params = _combine(_lora_base(meta, config), state.get("params_trained", {}))
    if meta.get("lora"):
        params = lora_lib.merge(params, state["lora"], config, lora_lib.LoraConfig(**meta["lora"]))
    return config, jax.tree.map(jnp.asarray, params)


def _lora_base(meta: Mapping[str, Any], config: Config) -> Any:
    """The base params a LoRA run started from: its --init_ckpt (at the step it was then), or the random
    init of its config and seed."""
    init = meta.get("init_ckpt")
    if init is None:
        return init_params(config, jax.random.key(meta.get("seed", 0)))
    if not os.path.exists(init):
        raise CheckpointError(f"this LoRA checkpoint holds only adapters; its base weights were read from {init!r}, "
                              "which no longer exists. Restore that directory, or export the merged model from the "
                              "run that wrote it (--export_hf).")
    base = resolve(init)
    if base.kind == "training" and base.step != meta.get("init_step"):
        raise CheckpointError(f"this LoRA checkpoint's base is step {meta.get('init_step')} of the training run "
                              f"{init!r}, which has since moved to step {base.step}; its adapters belong to the "
                              "older base. Export the merged model from the LoRA run's own workdir before continuing "
                              "the base run, or start a new LoRA run.")
    return load(base.path, step=base.step, dtype=config.param_dtype)[1]


def load(path: str | os.PathLike, parallel: Parallelism | None = None, dtype: Any = None, *,
         step: int | None = None, shardings: Any = None) -> tuple[Config, Any]:
    """(config, params) of any dsjax model on disk: a converted checkpoint, a training run (latest step or
    `step`; LoRA adapters merged) or an HF directory.

    parallel: a layout (`sharding.MeshParallelism(mesh)`): converted checkpoints restore straight into its
      shardings; the others are placed after reading. dtype: storage dtype of the large matrices (default:
      as stored). shardings: explicit params-shaped shardings (converted checkpoints).
    Raises CheckpointError naming the directory, what it holds and what to pass instead.
    """
    md = resolve(path, step)
    if md.kind == "converted":
        return load_converted(md.path, parallel, dtype, shardings=shardings)
    if md.kind == "hf":
        config, params = load_hf(md.path, dtype=dtype or jnp.float32)
    else:
        config, params = _training_params(md)
        if dtype is not None:  # as converted checkpoints: the dtype becomes the param and compute dtype
            name = jnp.dtype(dtype).name
            config = config.replace(dtype=name, param_dtype=name)
            params = jax.tree.map(lambda s, x: x.astype(param_dtype(s, config)), param_specs(config), params,
                                  is_leaf=lambda x: isinstance(x, ParamSpec))
    if parallel is not None:
        parallel_lib.check(parallel, config)
        params = parallel.place_params(params, config)
    return config, params
