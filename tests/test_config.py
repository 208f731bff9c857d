"""dsjax.Config: presets, HF config.json reading (both rope key styles), validation errors."""

import json

import pytest

from dsjax import Config, RopeScaling

OFFICIAL_V32 = {  # the released DeepSeek-V3.2 config.json, legacy rope keys (spec §1.1)
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 2048, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 1, "aux_loss_alpha": 0.001, "ep_size": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}


def test_preset_matches_official_config():
    official = Config.from_hf(OFFICIAL_V32)
    preset = Config.preset("deepseek-v3.2")
    assert official.replace(fp8_weight_block=None) == preset
    assert official.fp8_weight_block == 128
    assert preset.has_indexer and not Config.preset("deepseek-v3").has_indexer
    assert preset.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-12)
    assert preset.n_dense_layers == 3 and preset.n_moe_layers == 58


def test_from_hf_rope_parameters_style_and_file(tmp_path):
    d = dict(OFFICIAL_V32)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in rs.items() if k != "type"}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    a, b = Config.from_hf(tmp_path), Config.from_hf(OFFICIAL_V32)
    assert a.rope_scaling == b.rope_scaling == RopeScaling(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert a == b


def test_from_hf_v3_and_overrides():
    d = {k: v for k, v in OFFICIAL_V32.items() if not k.startswith("index_")}
    d["model_type"] = "deepseek_v3"
    c = Config.from_hf(d, dtype="float32")
    assert not c.has_indexer and c.dtype == "float32"


def test_to_hf_round_trip():
    for name in ("tiny", "tiny-v3", "deepseek-v3.2"):
        c = Config.preset(name)
        back = Config.from_hf(json.loads(json.dumps(c.to_hf())), dtype=c.dtype, param_dtype=c.param_dtype)
        assert back == c, name


@pytest.mark.parametrize("field,value,needle", [
    ("n_routed_experts", 10, "n_routed_experts"),
    ("index_topk", 0, "index_topk"),
    ("model_type", "llama", "model_type"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("topk_group", 9, "topk_group"),
    ("num_experts_per_tok", 200, "num_experts_per_tok"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("first_k_dense_replace", 70, "first_k_dense_replace"),
    ("dtype", "int8", "dtype"),
    ("indexer_numerics", "fp4", "indexer_numerics"),
    ("hidden_size", -1, "hidden_size"),
    ("attention_backend", "cuda", "attention_backend"),
    ("routed_scaling_factor", -2.5, "routed_scaling_factor"),
    ("eos_token_id", 129280, "eos_token_id"),  # == vocab_size of the 671B preset: not a token id
    ("bos_token_id", -1, "bos_token_id"),
])
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=rf"Config\.{needle}"):
        Config.preset("deepseek-v3.2", **{field: value})


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        Config.from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="No HF config"):
        Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.from_hf(tmp_path)
    bad = dict(OFFICIAL_V32, mlp_layer_types=["sparse"] * 61)
    with pytest.raises(ValueError, match="mlp_layer_types"):
        Config.from_hf(bad)
    with pytest.raises(ValueError, match="Unknown preset"):
        Config.preset("gpt-5")


def test_config_is_hashable_static_arg():
    assert hash(Config.preset("tiny")) == hash(Config.preset("tiny"))
