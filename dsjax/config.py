"""Model configuration: one frozen dataclass for DeepSeek V3.2 and V3 / V3.1 / R1.

Field names follow the HF `config.json` keys, so a user who knows the checkpoint knows the config.
V3, V3.1 and R1 are V3.2 without the lightning indexer (`model_type="deepseek_v3"`).

Every invalid value raises one `ValueError` that names the field and says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

MODEL_TYPES = ("deepseek_v32", "deepseek_v3")
DTYPES = ("float32", "bfloat16", "float16")
INDEXER_NUMERICS = ("bf16", "official_fp8")
BACKENDS = (None, "xla", "pallas_tpu", "pallas_gpu")
MOE_IMPLS = ("auto", "ragged_dot", "blocked")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (HF `rope_scaling` / `rope_parameters`)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    type: str = "yarn"


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepSeek V3-family architecture plus dsjax numerics/runtime options.

    Architecture fields use HF `config.json` names. The last block of fields are dsjax options
    (dtypes, kernel backends, chunk sizes); they never change the parameter tree.
    """

    model_type: str = "deepseek_v32"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    rope_interleave: bool = True
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # FP8 block-scaled weight storage of the official checkpoints (None: plain floating point).
    fp8_weight_block: int | None = None
    # ---- dsjax numerics and runtime options (not architecture) ----
    dtype: str = "bfloat16"  # activations / matmul inputs
    param_dtype: str = "bfloat16"  # large matrices; norms, router and indexer weights stay fp32
    indexer_numerics: str = "bf16"  # "bf16" = HF transformers; "official_fp8" = official kernels
    attention_backend: str | None = None  # None = pick from the default device
    indexer_backend: str | None = None
    kernel_interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)
    attn_chunk_size: int = 256  # query rows per step of the XLA attention / indexer scans
    moe_impl: str = "auto"  # grouped matmul: ragged_dot on TPU/GPU, blocked scan on CPU
    moe_block_size: int = 128  # row block of the "blocked" grouped matmul

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"Config.{field}={getattr(self, field)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"unknown model type; expected one of {MODEL_TYPES}.")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "max_position_embeddings", "attn_chunk_size", "moe_block_size"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                bad(f, "must be a positive integer.")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be a positive integer, or None for a direct q projection.")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            bad("num_key_value_heads",
                f"MLA has one latent KV shared by all heads; num_key_value_heads must equal "
                f"num_attention_heads ({self.num_attention_heads}) or be omitted.")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs).")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}].")
        if self.moe_layer_freq != 1:
            bad("moe_layer_freq", "only 1 (every layer after the dense prefix is MoE) is supported.")
        if self.n_routed_experts % self.n_group:
            bad("n_routed_experts", f"must be divisible by n_group={self.n_group}.")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("n_group", "group-limited routing scores a group by its top-2 experts; "
                "each group needs at least 2 experts.")
        if self.topk_group > self.n_group:
            bad("topk_group", f"cannot exceed n_group={self.n_group}.")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            bad("num_experts_per_tok", f"only {reachable} experts are reachable through "
                f"topk_group={self.topk_group} groups; lower it or raise topk_group.")
        if self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0.")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", "must be a positive number (it scales the routed experts' output).")
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(f, f"must be a token id in [0, vocab_size={self.vocab_size}) or None.")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", "only the V3-family 'sigmoid' router is supported.")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported.")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "DeepSeek V3 models have an untied lm_head; set it to False.")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be > 0.")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", "dsjax supports 0 or 1 MTP module (the released models use 1).")
        if self.has_indexer:
            for f in ("index_n_heads", "index_head_dim", "index_topk"):
                v = getattr(self, f)
                if not isinstance(v, (int, np.integer)) or v <= 0:
                    bad(f, "must be a positive integer.")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} "
                    "(the indexer rotates its first qk_rope_head_dim dims).")
            if self.q_lora_rank is None:
                bad("q_lora_rank", "the V3.2 lightning indexer reads the q latent; q_lora_rank is required.")
            if self.indexer_numerics == "official_fp8" and self.index_head_dim & (self.index_head_dim - 1):
                bad("index_head_dim", "official_fp8 numerics apply a Hadamard transform, which needs "
                    "a power-of-two index_head_dim.")
        if self.indexer_numerics == "official_fp8" and self.fp8_weight_block:
            # the official act_quant quantises each FP8 linear's input in whole 128-blocks (one block if shorter)
            for f, v in (("hidden_size", self.hidden_size), ("q_lora_rank", self.q_lora_rank),
                         ("kv_lora_rank", self.kv_lora_rank), ("intermediate_size", self.intermediate_size),
                         ("moe_intermediate_size", self.moe_intermediate_size),
                         ("v_head_dim", self.num_attention_heads * self.v_head_dim)):
                if v and v > 128 and v % 128:
                    bad(f, f"official_fp8 numerics with FP8 weights quantise this linear input ({v}) in blocks of "
                        "128; it must be a multiple of 128 (or at most 128).")
        if self.dtype not in DTYPES:
            bad("dtype", f"expected one of {DTYPES}.")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"expected one of {DTYPES}.")
        if self.indexer_numerics not in INDEXER_NUMERICS:
            bad("indexer_numerics", f"expected one of {INDEXER_NUMERICS}.")
        for f in ("attention_backend", "indexer_backend"):
            if getattr(self, f) not in BACKENDS:
                bad(f, f"expected one of {BACKENDS}.")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"expected one of {MOE_IMPLS}.")
        if self.fp8_weight_block is not None and self.fp8_weight_block <= 0:
            bad("fp8_weight_block", "must be a positive block size or None.")
        rs = self.rope_scaling
        if rs is not None:
            if rs.type not in ("yarn",):
                bad("rope_scaling", f"rope type {rs.type!r} is not supported; use 'yarn' or no scaling.")
            if rs.factor <= 0 or rs.original_max_position_embeddings <= 0:
                bad("rope_scaling", "factor and original_max_position_embeddings must be > 0.")

    # ------------------------------------------------------------------ derived
    @property
    def official_numerics(self) -> bool:
        """The official inference code's rounding points (`indexer_numerics="official_fp8"`, spec §4.6, §5.3,
        §6.1, §7.2-7.3): UE8M0 activation quantisation before every FP8 linear, the latent FP8 round trip,
        bf16 expert gate/up, Hadamard + FP8 indexer in bf16."""
        return self.indexer_numerics == "official_fp8"

    @property
    def has_indexer(self) -> bool:
        """True for V3.2 (DSA); V3 / V3.1 / R1 attend densely."""
        return self.model_type == "deepseek_v32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def mtp_is_moe(self) -> bool:
        """The MTP block has HF layer index num_hidden_layers; it is MoE past the dense prefix."""
        return self.num_hidden_layers >= self.first_k_dense_replace

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def softmax_scale(self) -> float:
        """MLA logit scale: d_qk^-1/2, times mscale(s, mscale_all_dim)^2 under YaRN (spec §1.2)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Config":
        """Named configurations: "deepseek-v3.2" (671B), "deepseek-v3" (671B, dense MLA), "tiny", "small".

        `tiny` and `small` are V3.2 models for tests, quickstart and CPU benchmarks; `tiny-v3` is `tiny`
        without the indexer.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "Config":
        """Build a Config from a HF `config.json` (a directory, the file, or its parsed dict).

        Reads `model_type` "deepseek_v32" or "deepseek_v3" and rope/YaRN from either the legacy
        `rope_scaling` + `rope_theta` keys or the HF 5.x `rope_parameters` block. `overrides` set dsjax
        options such as `dtype`.
        """
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise ValueError(f"No HF config at {p!r}: pass a directory holding config.json, the file, or a dict.")
            try:
                with open(p) as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON ({e}); re-export the HF config.") from None
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"Config.model_type={mt!r}: unknown model type in the HF config; dsjax reads "
                             f"{MODEL_TYPES} (V3, V3.1 and R1 use 'deepseek_v3').")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in fields and k not in ("rope_scaling",)}
        kw.pop("dtype", None)  # HF's storage dtype is not our compute dtype
        if "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = int(d.get("num_mtp_layers", 0) or 0)
        # Rope: HF 5.x nests everything under rope_parameters; older files use rope_scaling + rope_theta.
        rp = d.get("rope_parameters") or {}
        legacy = d.get("rope_scaling") or {}
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        kw["rope_theta"] = float(theta)
        src = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else legacy
        rtype = src.get("rope_type", src.get("type", "default")) if src else "default"
        if rtype in ("default", None):
            kw["rope_scaling"] = None
        else:
            factor = src.get("factor")
            orig = src.get("original_max_position_embeddings")
            if orig is None:
                raise ValueError("Config.rope_scaling: YaRN needs original_max_position_embeddings in the HF config.")
            if factor is None:
                factor = d.get("max_position_embeddings", orig) / orig
            kw["rope_scaling"] = RopeScaling(
                factor=float(factor), original_max_position_embeddings=int(orig),
                beta_fast=float(src.get("beta_fast") or 32), beta_slow=float(src.get("beta_slow") or 1),
                mscale=float(src.get("mscale") or 0.0), mscale_all_dim=float(src.get("mscale_all_dim") or 0.0),
                type=str(rtype))
        mlt = d.get("mlp_layer_types")
        if mlt is not None:
            k = int(d.get("first_k_dense_replace", 0))
            if list(mlt) != ["dense"] * k + ["sparse"] * (len(mlt) - k):
                raise ValueError(f"Config.mlp_layer_types={mlt}: dsjax scans a dense prefix then MoE layers; "
                                 "the pattern must be first_k_dense_replace 'dense' then 'sparse'.")
        qc = d.get("quantization_config") or {}
        if qc.get("quant_method") == "fp8":
            kw["fp8_weight_block"] = int((qc.get("weight_block_size") or [128, 128])[0])
        if kw.get("num_key_value_heads") in (None, kw.get("num_attention_heads", cls.num_attention_heads)):
            kw.pop("num_key_value_heads", None)  # MLA: always one latent per token; nothing to record
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0] if kw[key] else None
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able values (what training checkpoints record; `from_dict` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Inverse of `to_dict`."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this model (architecture fields only)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV32ForCausalLM" if self.has_indexer else "DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
        }
        skip = {"rope_scaling", "dtype", "param_dtype", "indexer_numerics", "attention_backend",
                "indexer_backend", "kernel_interpret", "attn_chunk_size", "moe_impl", "moe_block_size",
                "fp8_weight_block", "num_key_value_heads"}
        if not self.has_indexer:
            skip |= {"index_n_heads", "index_head_dim", "index_topk"}
        for f in dataclasses.fields(self):
            if f.name not in skip and f.name != "model_type":
                d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        rs = self.rope_scaling
        if rs is None:
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            d["rope_parameters"] = {"rope_type": rs.type, "rope_theta": self.rope_theta, "factor": rs.factor,
                                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                                    "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
                                    "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim}
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        d["dtype"] = self.param_dtype
        return d


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·m·ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3.2": dict(),
    "deepseek-v3": dict(model_type="deepseek_v3"),
    # A small V3.2 that still has every feature: 2 dense + 2 MoE layers, groups, MTP, and a top-k that
    # prunes for sequences longer than 64 tokens.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                 q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                 v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=64,
                 max_position_embeddings=2048,
                 rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=512),
                 num_nextn_predict_layers=1, dtype="float32", param_dtype="float32"),
    # A CPU-benchmark model (~100M params) with realistic ratios.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
                  num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, index_n_heads=8, index_head_dim=64, index_topk=256,
                  max_position_embeddings=32768,
                  rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=4096),
                  dtype="float32", param_dtype="float32"),
}
PRESETS["tiny-v3"] = {**{k: v for k, v in PRESETS["tiny"].items() if not k.startswith("index_")},
                      "model_type": "deepseek_v3"}
