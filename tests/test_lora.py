"""LoRA: adapter layout and merge math against numpy, training leaves the base bit-identical, target options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax import lora
from dsjax.train import schedule, step as step_lib

CFG = dsjax.Config.preset("tiny", index_topk=8)


@pytest.fixture(scope="module")
def params():
    return dsjax.init_params(CFG, jax.random.key(0))


def test_targets_and_merge_math(params):
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("attn", "shared", "experts"))
    specs = lora.target_specs(CFG, cfg)
    names = {".".join(p) for p in specs}
    assert {"dense.attn.wq_a", "moe.attn.wkv_b", "moe.attn.wo", "mtp.block.attn.wq_b",
            "moe.moe.shared.down", "moe.moe.experts.gate"} <= names
    assert not any("indexer" in n or n.endswith(("router", "bias", "norm")) or ".mlp." in n for n in names)
    assert {".".join(p) for p in lora.target_specs(CFG, lora.LoraConfig(rank=2))} == {
        n for n in names if ".attn." in n}
    ad = lora.init(CFG, cfg, jax.random.key(1))
    # B starts at zero, so the merged model is the base model.
    same = lora.apply(params, ad, CFG, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))
    rng = np.random.default_rng(0)
    ad = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), ad)
    merged = lora.merge(params, ad, CFG, cfg)
    s = cfg.scale
    assert s == 2.0
    # wq_b [L, Rq, H, dqk]: in = Rq, out = H·dqk per layer.
    w, a, b = (np.asarray(x) for x in (params["moe"]["attn"]["wq_b"], ad["moe"]["attn"]["wq_b"]["a"],
                                       ad["moe"]["attn"]["wq_b"]["b"]))
    want = w + s * np.einsum("lir,lro->lio", a, b).reshape(w.shape)
    np.testing.assert_allclose(merged["moe"]["attn"]["wq_b"], want, rtol=1e-5, atol=1e-6)
    # wo [L, H, dv, D]: in = H·dv (both contracted in attention), out = D.
    w, a, b = (np.asarray(x) for x in (params["dense"]["attn"]["wo"], ad["dense"]["attn"]["wo"]["a"],
                                       ad["dense"]["attn"]["wo"]["b"]))
    assert a.shape == (CFG.n_dense_layers, CFG.num_attention_heads * CFG.v_head_dim, 3)
    np.testing.assert_allclose(merged["dense"]["attn"]["wo"], w + s * np.einsum("lir,lro->lio", a, b).reshape(w.shape),
                               rtol=1e-5, atol=1e-6)
    # Routed experts [L, E, D, F]: one adapter per layer and expert.
    w, a, b = (np.asarray(x) for x in (params["moe"]["moe"]["experts"]["up"], ad["moe"]["moe"]["experts"]["up"]["a"],
                                       ad["moe"]["moe"]["experts"]["up"]["b"]))
    assert a.shape[:2] == (CFG.n_moe_layers, CFG.n_routed_experts)
    np.testing.assert_allclose(merged["moe"]["moe"]["experts"]["up"], w + s * np.einsum("leir,lero->leio", a, b),
                               rtol=1e-5, atol=1e-6)
    # Untargeted leaves are the very same arrays.
    assert merged["moe"]["moe"]["router"] is params["moe"]["moe"]["router"]
    with pytest.raises(ValueError, match="choose from"):
        lora.LoraConfig(rank=2, targets=("mlp",))
    with pytest.raises(ValueError, match="lora_rank=0"):
        lora.LoraConfig(rank=0)


def test_lora_training_keeps_the_base_bit_identical(params, tmp_path):
    from test_train import fresh, make_batch
    from train_util import leaf_pairs, run_steps

    cfg = lora.LoraConfig(rank=4, targets=("attn", "shared"))
    tc = step_lib.TrainConfig(lora=cfg, optim=schedule.OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                                                   total_steps=10))
    base = jax.tree.map(np.array, params)
    ad0 = lora.init(CFG, cfg, jax.random.key(3))
    state = step_lib.init_state(fresh(params), CFG, tc, jax.random.key(1), ad0)
    fn = step_lib.compiled_step(CFG, tc)
    batch = make_batch(seed=5)
    state, ce = run_steps(fn, state, batch, 8, "ce")
    assert ce[-1] < ce[0] - 0.5, ce
    for name, a, b in leaf_pairs(base, state["params"]):
        assert np.array_equal(a, b), name  # incl. router biases and indexer
    assert not np.array_equal(np.asarray(state["lora"]["moe"]["attn"]["wq_a"]["b"]), 0)
    # The optimizer holds state for the adapters only.
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert n_opt == 2 * lora.count(state["lora"])  # Adam mu + nu
    # Export: merged params reproduce the training-time model.
    merged = lora.merge(state["params"], state["lora"], CFG, cfg)
    tokens = jnp.asarray(batch["tokens"][:1])
    via_merge = dsjax.forward(merged, tokens, CFG)
    via_apply = dsjax.forward(lora.apply(state["params"], state["lora"], CFG, cfg), tokens, CFG)
    np.testing.assert_array_equal(np.asarray(via_merge), np.asarray(via_apply))
    assert not np.allclose(np.asarray(via_merge), np.asarray(dsjax.forward(state["params"], tokens, CFG)))
    # HF export of the merged model (checkpoints.save + checkpoints.export): HF transformers computes the same
    # logits from it. Compared over the first index_topk positions, where every causal key is selected: with
    # init_params' small indexer weights the index scores are near-ties, which HF and dsjax may break apart.
    import torch
    from transformers import AutoModelForCausalLM

    from dsjax.train import trainer

    trainer._exporter()(merged, CFG, str(tmp_path / "hf"), str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
    k = CFG.index_topk
    assert np.abs(ref[:, :k] - np.asarray(via_merge)[:, :k]).max() <= 1e-4 * np.abs(ref[:, :k]).max()
