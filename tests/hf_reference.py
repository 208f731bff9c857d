"""Tiny HF transformers reference models (torch CPU), built and saved by the tests themselves.

No hub is reachable, so every reference is a random model from a small config, saved with
`save_pretrained` and read back by dsjax's own loader. The configs exercise the paths that matter:
top-k pruning (L > index_topk), group-limited routing (n_group > 1, topk_group < n_group), a non-zero
`e_score_correction_bias`, YaRN, and indexer weights large enough that its scores are not degenerate.
"""

from __future__ import annotations

import os

import numpy as np

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=512, rope_parameters=YARN, routed_scaling_factor=2.5,
            initializer_range=0.1)
V32 = dict(BASE, index_n_heads=32, index_head_dim=16, index_topk=16)

INDEX_TOPK = V32["index_topk"]


def build_hf_model(kind: str = "v32", seed: int = 0, **overrides):
    """A random HF DeepseekV32ForCausalLM / DeepseekV3ForCausalLM in fp32 with eager attention."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    if kind == "v32":
        cfg = DeepseekV32Config(**{**V32, **overrides})
        model = DeepseekV32ForCausalLM(cfg)
    elif kind == "v3":
        cfg = DeepseekV3Config(**{**BASE, **overrides})
        model = DeepseekV3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "indexer" in name and name.endswith(("wq_b.weight", "wk.weight", "weights_proj.weight")):
                # Default init gives index scores ~1e-4 apart; scale up so the top-k is decisive.
                p.normal_(0.0, 0.5, generator=g)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.3 * torch.randn(mod.e_score_correction_bias.shape, generator=g))
    model.config._attn_implementation = "eager"
    return model.eval().float()


def save(model, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def capture_indexer(model, tokens: np.ndarray) -> list[dict]:
    """Per layer: the indexer's inputs (hidden, q_resid) and its top-k output, from one HF forward."""
    import torch

    records: list[dict] = []
    hooks = []
    for layer in model.model.layers:
        def hook(mod, args, kwargs, out, rec=records):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            qr = kwargs.get("q_resid", args[1] if len(args) > 1 else None)
            rec.append({"hidden": hs.detach().numpy().copy(), "q_resid": qr.detach().numpy().copy(),
                        "topk": out.detach().numpy().copy()})
        hooks.append(layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True))
    try:
        hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return records
