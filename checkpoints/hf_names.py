"""THE table between HF checkpoint names and the dsjax params tree (spec §9.1).

Every HF tensor maps to a `Target`: a path in the params tree, the index into the stacked layer axis
and the expert axis (for the scanned stacks and stacked experts), and how to transform it:

* `linear`: HF stores [out, in]; dsjax stores [in, out] and then views it in its logical shape
  (e.g. q_b_proj [H*(dn+dr), Rq] -> [Rq, H, dn+dr]). `n_in` is how many leading logical dims are "in".
* `quantized`: the official checkpoints store it as FP8 e4m3 with a `.weight_scale_inv` block grid.
* `shared`: the MTP layer's `embed_tokens` / `shared_head.head` duplicate the main embedding and head;
  they are checked on load and written back on export, not stored twice.

MTP (HF layer index num_hidden_layers) maps to its own subtree `mtp`, never into the main stacks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import numpy as np

from dsjax.config import Config
from dsjax.params import ParamSpec, param_specs

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]
    layer: int | None = None
    expert: int | None = None
    linear: bool = False
    quantized: bool = False
    n_in: int = 1
    shared: bool = False


# (HF suffix within a layer, params sub-path, linear, quantized, n_in)
_ATTN = [
    ("input_layernorm.weight", ("attn_norm",), False, False, 1),
    ("post_attention_layernorm.weight", ("mlp_norm",), False, False, 1),
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), True, True, 1),
    ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm"), False, False, 1),
    ("self_attn.kv_b_proj.weight", ("attn", "wkv_b"), True, True, 1),
    ("self_attn.o_proj.weight", ("attn", "wo"), True, True, 2),
]
_Q_LORA = [
    ("self_attn.q_a_proj.weight", ("attn", "wq_a"), True, True, 1),
    ("self_attn.q_a_layernorm.weight", ("attn", "q_norm"), False, False, 1),
    ("self_attn.q_b_proj.weight", ("attn", "wq_b"), True, True, 1),
]
_Q_DIRECT = [("self_attn.q_proj.weight", ("attn", "wq"), True, True, 1)]
_INDEXER = [
    ("self_attn.indexer.wq_b.weight", ("attn", "indexer", "wq_b"), True, True, 1),
    ("self_attn.indexer.wk.weight", ("attn", "indexer", "wk"), True, True, 1),
    ("self_attn.indexer.k_norm.weight", ("attn", "indexer", "k_norm_scale"), False, False, 1),
    ("self_attn.indexer.k_norm.bias", ("attn", "indexer", "k_norm_bias"), False, False, 1),
    ("self_attn.indexer.weights_proj.weight", ("attn", "indexer", "weights_proj"), True, False, 1),
]
_MLP = [(f"mlp.{n}_proj.weight", ("mlp", n), True, True, 1) for n in ("gate", "up", "down")]
_MOE = [
    ("mlp.gate.weight", ("moe", "router"), True, False, 1),
    ("mlp.gate.e_score_correction_bias", ("moe", "bias"), False, False, 1),
] + [(f"mlp.shared_experts.{n}_proj.weight", ("moe", "shared", n), True, True, 1) for n in ("gate", "up", "down")]
_EXPERT = [(f"{n}_proj.weight", ("moe", "experts", n), True, True, 1) for n in ("gate", "up", "down")]


def _block_entries(config: Config, is_moe: bool) -> list[tuple[str, tuple[str, ...], bool, bool, int]]:
    e = list(_ATTN) + (_Q_DIRECT if config.q_lora_rank is None else _Q_LORA)
    if config.has_indexer:
        e += _INDEXER
    if is_moe:
        e += [x for x in _MOE if config.n_shared_experts or "shared_experts" not in x[0]]
    else:
        e += _MLP
    return e


def hf_table(config: Config) -> dict[str, Target]:
    """HF tensor name -> Target, for every tensor of a checkpoint of this config (scales excluded)."""
    c = config
    t: dict[str, Target] = {
        "model.embed_tokens.weight": Target(("embed",)),
        "model.norm.weight": Target(("final_norm",)),
        "lm_head.weight": Target(("lm_head",), linear=True),
    }

    def add_block(prefix: str, root: tuple[str, ...], layer: int | None, is_moe: bool) -> None:
        for suffix, sub, linear, quant, n_in in _block_entries(c, is_moe):
            t[prefix + suffix] = Target(root + sub, layer, None, linear, quant, n_in)
        if is_moe:
            for ex in range(c.n_routed_experts):
                for suffix, sub, linear, quant, n_in in _EXPERT:
                    t[f"{prefix}mlp.experts.{ex}.{suffix}"] = Target(root + sub, layer, ex, linear, quant, n_in)

    for i in range(c.num_hidden_layers):
        is_moe = i >= c.first_k_dense_replace
        add_block(f"model.layers.{i}.", ("moe",) if is_moe else ("dense",),
                  i - c.first_k_dense_replace if is_moe else i, is_moe)
    if c.num_nextn_predict_layers:
        n = c.num_hidden_layers
        p = f"model.layers.{n}."
        t[p + "enorm.weight"] = Target(("mtp", "enorm"))
        t[p + "hnorm.weight"] = Target(("mtp", "hnorm"))
        t[p + "eh_proj.weight"] = Target(("mtp", "eh_proj"), linear=True)
        t[p + "shared_head.norm.weight"] = Target(("mtp", "norm"))
        t[p + "embed_tokens.weight"] = Target(("embed",), shared=True)
        t[p + "shared_head.head.weight"] = Target(("lm_head",), linear=True, shared=True)
        add_block(p, ("mtp", "block"), None, c.mtp_is_moe)
    return t


def fp8_quantization_config(block: int) -> dict[str, Any]:
    """The `quantization_config` of the official block-FP8 checkpoints' config.json."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}


def get_spec(specs: Any, path: tuple[str, ...]) -> ParamSpec:
    node = specs
    for k in path:
        node = node[k]
    return node


def matrix_shape(spec: ParamSpec, t: Target) -> tuple[int, ...]:
    """The per-matrix logical shape of a target (spec shape without stacked layer / expert axes)."""
    skip = (t.layer is not None) + (t.expert is not None)
    return spec.shape[skip:]


def hf_shape(spec: ParamSpec, t: Target) -> tuple[int, ...]:
    """The HF tensor shape of a target: [out, in] for linears, the matrix shape otherwise."""
    m = matrix_shape(spec, t)
    if t.linear:
        return (math.prod(m[t.n_in:]), math.prod(m[: t.n_in]))
    return m


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose(a: np.ndarray, tile: int = 128) -> np.ndarray:
    """Contiguous transpose of a 2-D array, tile by tile.

    numpy's own strided copy of a large transpose misses the cache on every element (~4x slower on a
    7168 x 2048 expert matrix); tiles keep both sides in cache. Bits are moved as unsigned ints, which
    also sidesteps the slow generic copy of ml_dtypes (bf16, fp8).
    """
    r, c = a.shape
    src = a.view(_UINT[a.dtype.itemsize]) if a.dtype.itemsize in _UINT else a
    out = np.empty((c, r), src.dtype)
    for i in range(0, r, tile):
        for j in range(0, c, tile):
            out[j:j + tile, i:i + tile] = src[i:i + tile, j:j + tile].T
    return out.view(a.dtype)


def to_dsjax(a: np.ndarray, t: Target, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> dsjax matrix: transpose linears to [in, out], then view in the logical shape."""
    if t.linear:
        a = transpose(a)
    return np.ascontiguousarray(a).reshape(shape)


def to_hf(a: np.ndarray, t: Target) -> np.ndarray:
    """dsjax matrix (logical shape) -> HF tensor."""
    if t.linear:
        m = a.shape
        a = transpose(np.ascontiguousarray(a).reshape(math.prod(m[: t.n_in]), math.prod(m[t.n_in:])))
    return np.ascontiguousarray(a)


def row_block_slices(spec: ParamSpec, t: Target, rows: tuple[int, int] | None) -> tuple[slice, ...] | None:
    """Where HF rows [r0, r1) of a target land in its dsjax matrix, as one slice per matrix dim.

    HF rows are a linear's outputs (dsjax columns) or the embedding's rows. Returns None when the block
    is not one rectangular slice (a linear whose output is viewed as several logical dims, e.g. wq_b
    [Rq, H, dn+dr]); such tensors are read whole. rows=None: the whole matrix.
    """
    m = matrix_shape(spec, t)
    full = tuple(slice(None) for _ in m)
    if rows is None:
        return full
    if t.linear and len(m) - t.n_in == 1:
        return full[:-1] + (slice(*rows),)
    if not t.linear and len(m) == 2:
        return (slice(*rows),) + full[1:]
    return None


def row_blocks(rows: int, cols: int, bytes_per_elem: int, block_bytes: int, align: int = 1
               ) -> list[tuple[int, int] | None]:
    """Split a [rows, cols] HF tensor into row ranges of at most ~block_bytes (starts aligned to `align`,
    e.g. the FP8 scale block), or [None]: one block, the whole tensor."""
    if rows * cols * bytes_per_elem <= block_bytes:
        return [None]
    rb = max(align, (block_bytes // (cols * bytes_per_elem)) // align * align)
    return [(r, min(rows, r + rb)) for r in range(0, rows, rb)]


def block_shape(spec: ParamSpec, t: Target, rows: tuple[int, int] | None) -> tuple[int, ...]:
    """Logical shape of the dsjax matrix block holding HF rows [r0, r1) (the whole matrix if rows is None)."""
    m = matrix_shape(spec, t)
    sl = row_block_slices(spec, t, rows)
    if sl is None:
        raise ValueError(f"HF rows of {t.path} do not map to one block of its dsjax matrix {list(m)}.")
    return tuple(len(range(*s.indices(d))) for s, d in zip(sl, m))


def iter_targets(config: Config) -> Iterator[tuple[str, Target, ParamSpec]]:
    """(HF name, target, spec of the target's params leaf) for every tensor of the checkpoint."""
    specs = param_specs(config)
    for name, t in hf_table(config).items():
        yield name, t, get_spec(specs, t.path)


def leaf_paths(config: Config) -> list[tuple[str, ...]]:
    """Every params-tree leaf path, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    return [tuple(k.key for k in path) for path, _ in flat]
