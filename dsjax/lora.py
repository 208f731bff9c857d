"""LoRA: low-rank adapters W + (α/r)·A·B on chosen weights; the base params stay frozen.

The adapters live in their own pytree that mirrors the params paths down to each adapted leaf, where it
holds {"a": [*batch, in, r], "b": [*batch, r, out]} ("batch" = the leaf's stacking axes: layers, and
experts for routed experts; "in" / "out" = the matrix's input and output axes, flattened). B starts at
zero, so training starts from the base model exactly.

`apply(params, adapters, cfg)` returns params with every adapted weight replaced by W + (α/r)·A·B: it is
both the training-time view (the forward pass sees merged weights, gradients reach only A and B) and the
export merge (fold the adapters into the base weights, e.g. before `checkpoints` export).

Targets: "attn" = the MLA projections (wq / wq_a / wq_b / wkv_a / wkv_b / wo; not the indexer, which has
its own training stage), "shared" = the shared experts, "experts" = the routed experts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.params import ParamSpec, param_specs

TARGETS = ("attn", "shared", "experts")
MLA_WEIGHTS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
BATCH_AXES = ("layers", "exp")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float | None = None  # default: rank (scale 1)
    targets: tuple[str, ...] = ("attn",)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
        if self.rank < 1:
            raise ValueError(f"lora_rank={self.rank} must be >= 1 (0 disables LoRA).")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora_targets={','.join(self.targets)!r}: choose from {TARGETS}.")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _is_target(path: tuple[str, ...], targets: tuple[str, ...]) -> bool:
    name = path[-1]
    if "attn" in targets and len(path) >= 2 and path[-2] == "attn" and name in MLA_WEIGHTS:
        return True
    if "shared" in targets and len(path) >= 2 and path[-2] == "shared":
        return True
    return "experts" in targets and len(path) >= 2 and path[-2] == "experts"


def _layout(spec: ParamSpec, name: str) -> tuple[int, int]:
    """(number of leading batch axes, number of input axes) of one weight."""
    nb = 0
    while nb < len(spec.axes) and spec.axes[nb] in BATCH_AXES:
        nb += 1
    return nb, 2 if name == "wo" else 1  # wo [H, dv, D] contracts heads and v_head


def target_specs(config: Config, cfg: LoraConfig) -> dict[tuple[str, ...], ParamSpec]:
    """{params path: ParamSpec} of every weight that gets an adapter."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    out = {}
    for kp, spec in flat:
        path = tuple(k.key for k in kp)
        if _is_target(path, cfg.targets):
            out[path] = spec
    return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def init(config: Config, cfg: LoraConfig, rng: jax.Array) -> dict:
    """Adapters for every target weight: A ~ N(0, 1/in), B = 0 (fp32)."""
    adapters: dict = {}
    for i, (path, spec) in enumerate(sorted(target_specs(config, cfg).items())):
        nb, ni = _layout(spec, path[-1])
        batch, fan_in, fan_out = spec.shape[:nb], math.prod(spec.shape[nb:nb + ni]), math.prod(spec.shape[nb + ni:])
        a = jax.random.normal(jax.random.fold_in(rng, i), batch + (fan_in, cfg.rank), jnp.float32) * fan_in ** -0.5
        _set(adapters, path, {"a": a, "b": jnp.zeros(batch + (cfg.rank, fan_out), jnp.float32)})
    return adapters


def apply(params: Mapping[str, Any], adapters: Mapping[str, Any], config: Config, cfg: LoraConfig) -> dict:
    """params with W -> W + scale·A·B on every adapted leaf (same dtypes and shapes as params)."""
    out = jax.tree.map(lambda x: x, dict(params))  # new containers, same leaves
    for path, spec in target_specs(config, cfg).items():
        w = _get(params, path)
        if isinstance(w, Mapping):
            raise ValueError(f"LoRA on {'.'.join(path)}: the base weight is FP8 block-scaled; load the checkpoint "
                             "dequantised (a float dtype) to train adapters on it.")
        ad = _get(adapters, path)
        nb, _ = _layout(spec, path[-1])
        delta = jnp.einsum("...ir,...ro->...io", ad["a"], ad["b"]) * cfg.scale
        _set(out, path, (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype))
    return out


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], config: Config, cfg: LoraConfig) -> dict:
    """Fold the adapters into the base weights for export (a plain params tree, no adapters)."""
    return apply(params, adapters, config, cfg)


def count(adapters: Mapping[str, Any]) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))
