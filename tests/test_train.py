"""The training step: overfitting, losses against numpy, the router-bias update (never touched by the
optimizer), MoE balancing on a skewed router, gradient accumulation, frozen leaves, schedule, indexer stages,
and clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.train import evaluate, losses, schedule, step as step_lib
from train_util import leaf_pairs

CFG = dsjax.Config.preset("tiny", index_topk=8)  # rows of 32 tokens > 8: DSA prunes
B, L = 4, 32
# The settings test_train_resume.py's finetune.py flags produce (same config, same batch shape): in one pytest
# process both share a single compile of the step.
TC = step_lib.TrainConfig(optim=schedule.OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=1000),
                          grad_accum=2, remat="full", bias_update_rate=1e-3)


def make_batch(seed=0, b=B, length=L, n_docs=2):
    """Random tokens packed as n_docs documents per row (segment ids, per-document positions, targets)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, CFG.vocab_size, (b, length + 1)).astype(np.int32)
    cut = length // n_docs
    seg = np.repeat(np.arange(1, n_docs + 1), cut)[None].repeat(b, 0).astype(np.int32)
    pos = np.tile(np.arange(cut), n_docs)[None].repeat(b, 0).astype(np.int32)
    w = np.ones((b, length), np.float32)
    w[:, cut - 1::cut] = 0.0  # last token of a document has no target in the same document
    return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "weights": w, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def params():
    return dsjax.init_params(CFG, jax.random.key(0))


def fresh(tree):
    """A device copy: the compiled step donates its state, which would delete the shared fixture's arrays."""
    return jax.tree.map(jnp.copy, tree)


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def overfit(params):
    """30 steps on one fixed batch; keeps the first and last states and per-step metrics."""
    state = step_lib.init_state(fresh(params), CFG, TC, jax.random.key(1))
    first = _copy(state)
    fn = step_lib.compiled_step(CFG, TC)
    batch = make_batch()
    hist, snaps = [], []
    for i in range(30):
        before = _copy(state["params"]) if i < 2 else None
        state, m = fn(state, batch)
        m = jax.device_get(m)
        hist.append(m)
        if before is not None:
            snaps.append((before, _copy(state["params"]), m))
    return {"first": first, "last": _copy(state), "hist": hist, "snaps": snaps, "batch": batch}


def test_tiny_model_overfits_a_batch(overfit):
    ce = [float(m["ce"]) for m in overfit["hist"]]
    assert ce[0] > 5.5  # ~ln(512) at init
    assert ce[-1] < 1.0, ce
    assert float(overfit["hist"][-1]["mtp"]) < 2.0  # the MTP head learns token i+2 too
    assert int(overfit["last"]["step"]) == 30


def test_router_bias_moves_only_by_the_load_rule(overfit):
    """Each step moves every MoE layer's correction bias by exactly -γ (overloaded), +γ (underloaded) or 0,
    from the step's own expert load; the optimizer never touches it (spec §6.3)."""
    gamma, e = TC.bias_update_rate, CFG.n_routed_experts
    for before, after, m in overfit["snaps"]:
        load = np.asarray(m["moe_load"])  # [L_moe, E]
        np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
        want = before["moe"]["moe"]["bias"] + gamma * np.sign(1.0 / e - load)
        np.testing.assert_allclose(after["moe"]["moe"]["bias"], want, atol=1e-7)
        assert np.any(after["moe"]["moe"]["bias"] != before["moe"]["moe"]["bias"])
        mtp_delta = after["mtp"]["block"]["moe"]["bias"] - before["mtp"]["block"]["moe"]["bias"]
        assert np.all(np.isclose(np.abs(mtp_delta), gamma, atol=1e-7) | (mtp_delta == 0)) and np.any(mtp_delta)
    # The optimizer state has no slot for the biases (nor for the indexer, which SFT leaves alone).
    names = {".".join(step_lib._path_names(kp)) for kp, _ in
             jax.tree_util.tree_flatten_with_path(overfit["last"]["opt_state"])[0]}
    assert not any(n.endswith("moe.bias") or "indexer" in n for n in names)
    assert any("moe.router" in n for n in names)


def test_sft_leaves_indexer_untouched_and_trains_the_rest(overfit):
    p0, p1 = overfit["first"]["params"], overfit["last"]["params"]
    for name, a, b in leaf_pairs(p0, p1):
        if "indexer" in name:
            assert np.array_equal(a, b), name
        elif not name.endswith("moe.bias") and a.ndim > 1:
            assert not np.array_equal(a, b), name


def test_bf16_compute_with_fp32_master_weights_and_optimizer_state(params, overfit):
    """dtype=bfloat16 compute, param_dtype=float32: the loss matches fp32 to bf16 accuracy, and params and
    Adam moments stay fp32."""
    cfg = CFG.replace(dtype="bfloat16")
    state = step_lib.init_state(fresh(params), cfg, TC, jax.random.key(1))
    state, m = step_lib.compiled_step(cfg, TC)(state, overfit["batch"])
    np.testing.assert_allclose(float(m["ce"]), float(overfit["hist"][0]["ce"]), rtol=2e-2)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    adam = state["opt_state"][1][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}


def test_chunked_head_cross_entropy_equals_the_full_logits():
    from dsjax.layers import dense_fp32

    b, length, d, v = 2, 24, 16, 50
    assert losses.ce_chunks(b, length, v, b * length * v * 4) == 1
    assert losses.ce_chunks(b, length, v, b * 4 * v * 4) == 6  # 24 / 6 = 4 positions per chunk
    assert losses.ce_chunks(b, length, v, b * 5 * v * 4) == 6  # 5 does not divide 24
    assert losses.ce_chunks(b, length, v, 1) == length
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, (b, length)))
    w = jnp.asarray((rng.random((b, length)) > 0.2).astype(np.float32))

    def full(h, head):
        return losses.cross_entropy(dense_fp32(h, head), t, w)[0]

    def chunked(h, head):
        return losses.head_cross_entropy(h, head, t, w, chunk_bytes=b * 4 * v * 4)[0]

    (f, gf), (c, gc) = [jax.value_and_grad(fn, argnums=(0, 1))(h, head) for fn in (full, chunked)]
    np.testing.assert_allclose(float(c), float(f), rtol=1e-6)
    for got, want in zip(gc, gf):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_never_holds_all_logits():
    """The compiled loss+gradient of a 4K-token row with a 32K vocabulary: chunked into 64 MiB pieces its
    temporaries stay within a few chunks (logits and their cotangent), far under the 512 MiB of full logits
    that the unchunked loss exceeds."""
    b, length, d, v = 1, 4096, 64, 32768
    full_logits = b * length * v * 4
    args = (jax.ShapeDtypeStruct((b, length, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, length), jnp.int32), jax.ShapeDtypeStruct((b, length), jnp.float32))

    def temp(chunk_bytes):
        fn = jax.grad(lambda h, head, t, w: losses.head_cross_entropy(h, head, t, w, chunk_bytes=chunk_bytes)[0],
                      argnums=(0, 1))
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp(None) >= full_logits
    assert temp(64 << 20) < 3 * (64 << 20) < full_logits


def test_chunked_loss_in_the_step_equals_unchunked(params):
    """The whole objective (CE + MTP CE + balance) and its gradients do not depend on the chunking."""
    batch = {k: jnp.asarray(x) for k, x in make_batch(3).items()}
    variables = {"params": params}
    out = []
    for chunk in (None, 2 * 4 * CFG.vocab_size * 4):  # 4 positions of 2 rows per chunk: 8 chunks
        tc = step_lib.TrainConfig(remat=None, ce_chunk_bytes=chunk)
        train = step_lib.trainable(variables, tc)
        denom = {"tokens": jnp.sum(batch["weights"]), "mtp_tokens": jnp.sum(batch["weights"])}
        mb = {k: x[:2] for k, x in batch.items()}
        loss_fn = lambda tr: step_lib._loss(tr, variables, mb, denom, CFG, tc)  # noqa: E731
        (loss, (terms, _)), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(train)  # eager: 200 s
        out.append((loss, terms, g))
    (l0, t0, g0), (l1, t1, g1) = out
    assert set(t0) >= {"ce", "mtp", "balance"}
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for k in t0:
        np.testing.assert_allclose(float(t1[k]), float(t0[k]), rtol=1e-6)
    for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-7)


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    t = rng.integers(0, 7, (2, 5))
    w = (rng.random((2, 5)) > 0.3).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, t[..., None], -1)[..., 0])
    s, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(w))
    np.testing.assert_allclose(float(s), (nll * w).sum(), rtol=1e-5)
    assert float(n) == w.sum()
    # Balance loss: Σ_i f_i P_i with f_i = E·load_i (spec §6.3), summed over layers, mean over sequences.
    load = rng.dirichlet(np.ones(4), size=(3, 2)).astype(np.float32)
    score = rng.dirichlet(np.ones(4), size=(3, 2)).astype(np.float32)
    want = np.mean(np.sum(4 * load * score, -1), -1).sum()
    np.testing.assert_allclose(float(losses.balance_loss(jnp.asarray(load), jnp.asarray(score))), want, rtol=1e-5)
    t2, w2 = losses.mtp_targets(jnp.asarray([[5, 6, 7, 8]]), jnp.ones((1, 4)), jnp.asarray([[1, 1, 2, 2]]))
    assert t2.tolist() == [[6, 7, 8, 0]] and w2.tolist() == [[1, 0, 1, 0]]


def test_bias_update_balances_a_skewed_router():
    """Tokens sharing a direction the router favours send most slots to experts 0-1; repeated aux-loss-free
    updates (the bias enters only the selection, `moe.route`) bring the load back to balance."""
    from dsjax import moe

    rng = np.random.default_rng(0)
    d, e = CFG.hidden_size, CFG.n_routed_experts
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    x = jnp.asarray(rng.normal(size=(512, d)) + 2.0 * u, jnp.float32)
    router = rng.normal(size=(d, e)) * 0.05
    router[:, :2] += u[:, None]
    router = jnp.asarray(router, jnp.float32)

    @jax.jit
    def load_of(bias):
        r = moe.route(x, router, bias, CFG)
        return jnp.bincount(r.experts.reshape(-1), length=e) / r.experts.size

    bias, imbalance = jnp.zeros(e), []
    for _ in range(60):
        load = load_of(bias)
        imbalance.append(float(losses.load_imbalance(load)))
        bias = losses.bias_update(bias, load, 0.01)
    assert imbalance[0] > 3.0, imbalance[0]  # 2 of 8 experts take most of the slots
    assert np.mean(imbalance[-10:]) < 1.35, imbalance[-10:]
    assert float(bias[0]) < 0 and float(bias[1]) < 0 and float(jnp.min(bias[2:])) > 0


def test_grad_accumulation_equals_full_batch(params):
    tc1 = dataclasses.replace(TC, grad_accum=1)
    tc2 = TC  # 2 micro-batches; shares the overfit test's compile
    batch = make_batch(seed=7)
    batch["weights"][0, :5] = 0.0  # unequal token counts per micro-batch: normalisation must be global
    outs = []
    for tc in (tc1, tc2):
        state = step_lib.init_state(fresh(params), CFG, tc, jax.random.key(1))
        new, m = step_lib.compiled_step(CFG, tc)(state, batch)
        outs.append((jax.device_get(new["params"]), jax.device_get(m)))
    (p1, m1), (p2, m2) = outs
    for k in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, err_msg=k)
    for name, a, b in leaf_pairs(p1, p2):
        # A bias sits exactly on the ±γ boundary only if an expert's load is exactly 1/E in one run and
        # not in the other (last-bit differences of the load average); allow that one step.
        tol = 1.01 * TC.bias_update_rate if name.endswith("moe.bias") else 2e-6
        np.testing.assert_allclose(a, b, atol=tol)


def test_schedule_warmup_then_cosine():
    c = schedule.OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    f = schedule.lr_schedule(c)
    assert float(f(0)) == 0.0
    np.testing.assert_allclose(float(f(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(f(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(f(60)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(f(110)), 1e-4, rtol=1e-5)


def test_indexer_warmup_lowers_kl_and_changes_only_the_indexer(params):
    tc = step_lib.TrainConfig(stage="indexer_warmup", optim=schedule.OptimConfig(
        learning_rate=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.0))
    state = step_lib.init_state(fresh(params), CFG, tc, jax.random.key(1))
    fn = step_lib.compiled_step(CFG, tc)
    batch = make_batch(seed=9)
    kls, mtp_kls = [], []
    for _ in range(15):
        state, m = fn(state, batch)
        kls.append(float(m["indexer_kl"]))
        mtp_kls.append(float(m["mtp_indexer_kl"]))
    assert kls[-1] < 0.8 * kls[0], kls
    assert mtp_kls[-1] < 0.8 * mtp_kls[0], mtp_kls  # the MTP block's indexer learns from its own KL
    changed = {"main": [], "mtp": []}
    for name, a, b in leaf_pairs(params, state["params"]):
        if "indexer" in name:
            changed["mtp" if name.startswith("mtp") else "main"].append(not np.array_equal(a, b))
        else:
            assert np.array_equal(a, b), f"{name} changed in indexer_warmup"
    assert any(changed["main"]) and changed["mtp"] and all(changed["mtp"])


def test_warmed_up_indexer_recalls_the_attentions_top_k(params):
    """After a short warm-up the indexer's top-k holds more of the attention's own top-k than at init
    (`evaluate.indexer_quality`). Random-init attention is nearly uniform, its top-k noise; scaling the query
    and key up-projections x4 gives it the peaked attention of a trained model (measured: recall 0.67 ->
    0.88, chance 0.66; KL 0.011 -> 0.002)."""
    sharp = fresh(params)
    for blk in ("dense", "moe"):
        for name in ("wq_b", "wkv_b"):
            sharp[blk]["attn"][name] = sharp[blk]["attn"][name] * 4.0
    tc = step_lib.TrainConfig(stage="indexer_warmup", optim=schedule.OptimConfig(
        learning_rate=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.0))
    batch = make_batch(seed=9)
    before = evaluate.indexer_quality(sharp, CFG, batch)
    state = step_lib.init_state(fresh(sharp), CFG, tc, jax.random.key(1))
    fn = step_lib.compiled_step(CFG, tc)
    for _ in range(15):
        state, _ = fn(state, batch)
    after = evaluate.indexer_quality(state["params"], CFG, batch)
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["recall"] > before["recall"] + 0.1 and after["recall"] > before["chance"] + 0.1, (before, after)


def test_sparse_stage_detaches_the_indexer(params):
    """Stage 2 trains everything with DSA on; the indexer learns only from its KL: with the KL weight at 0
    the language-modelling loss must leave the indexer bit-identical while the rest of the model moves."""
    tc = step_lib.TrainConfig(stage="sparse", indexer_loss_weight=0.0, bias_update_rate=0.0,
                              optim=schedule.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=5,
                                                         weight_decay=0.0))
    state = step_lib.init_state(fresh(params), CFG, tc, jax.random.key(1))
    state, m = step_lib.compiled_step(CFG, tc)(state, make_batch(seed=4))
    assert np.isfinite(float(m["indexer_kl"])) and float(m["indexer_kl"]) > 0
    assert np.isfinite(float(m["mtp_indexer_kl"])) and float(m["mtp_indexer_kl"]) > 0
    for name, a, b in leaf_pairs(params, state["params"]):
        if "indexer" in name:
            assert np.array_equal(a, b), f"the LM loss reached {name}"
        elif a.ndim > 1 and not name.endswith("moe.bias"):
            assert not np.array_equal(a, b), name


def test_clear_errors(params, tmp_path):
    from dsjax.train import data, trainer

    with pytest.raises(ValueError, match="stage='pretrain' is unknown"):
        step_lib.TrainConfig(stage="pretrain")
    with pytest.raises(ValueError, match="remat="):
        step_lib.TrainConfig(remat="some")
    with pytest.raises(ValueError, match="has none"):
        step_lib.check_stage(dsjax.Config.preset("tiny-v3"), step_lib.TrainConfig(stage="indexer_warmup"))
    dc = data.DataConfig(paths=(str(tmp_path / "x.jsonl"),), seq_len=4096, batch_size=2)
    rc = trainer.RunConfig(train=TC, data=dc, tokenizer="t.json", steps=3, workdir=str(tmp_path), model=CFG)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=2048"):
        trainer.validate(CFG, rc)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        trainer.validate(CFG, dataclasses.replace(rc, data=dataclasses.replace(dc, seq_len=32, batch_size=3),
                                                  train=dataclasses.replace(TC, grad_accum=2)))
    with pytest.raises(ValueError, match="float8|FP8"):
        fp8 = {**params, "embed": params["embed"].astype(jnp.float8_e4m3fn)}
        step_lib.trainable({"params": fp8}, TC)


def test_gradients_match_hf_transformers(hf_v32, tmp_path):
    """The training objective's gradients equal HF transformers' autograd on the same weights and tokens
    (fp32, a sequence longer than index_topk so DSA prunes). HF's gradients are written into a copy of the
    model and read back with the checkpoint loader, which maps them onto the dsjax params tree."""
    import copy

    import torch

    import checkpoints

    model, path = hf_v32
    cfg, params = checkpoints.load_hf(path)
    b, length = 2, 40
    assert length > cfg.index_topk
    x = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, length))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=torch.as_tensor(x), labels=torch.as_tensor(x)).loss  # mean CE of x[1:] given x[:-1]
    loss.backward()
    grads_model = copy.deepcopy(model)  # (deepcopy drops .grad: copy the gradients over by position)
    with torch.no_grad():
        for p, q in zip(model.parameters(), grads_model.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buf in grads_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()  # used only to select experts: no gradient
    grads_model.save_pretrained(str(tmp_path), safe_serialization=True)
    _, hf_grads = checkpoints.load_hf(str(tmp_path))

    tc = step_lib.TrainConfig(mtp_weight=0.0, balance_alpha=0.0, remat=None)
    batch = {"tokens": x, "targets": np.concatenate([x[:, 1:], x[:, :1]], 1), "segment_ids": np.ones_like(x),
             "weights": np.concatenate([np.ones((b, length - 1)), np.zeros((b, 1))], 1).astype(np.float32),
             "positions": np.broadcast_to(np.arange(length), (b, length))}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    variables = {"params": params}
    train = step_lib.trainable(variables, tc)
    denom = {"tokens": jnp.sum(batch["weights"]), "mtp_tokens": 1.0}
    ours, (terms, _) = jax.jit(lambda tr: step_lib._loss(tr, variables, batch, denom, cfg, tc))(train)
    np.testing.assert_allclose(float(ours), float(loss.detach()), rtol=1e-5)
    g = jax.jit(jax.grad(lambda tr: step_lib._loss(tr, variables, batch, denom, cfg, tc)[0]))(train)["params"]
    compared = 0
    for (name, want, _), got in zip(leaf_pairs(hf_grads, hf_grads), _flat_like(g, hf_grads)):
        if got is None:  # not trained in sft: the router biases and the indexer (HF: no gradient either)
            assert np.abs(want).max() == 0 or "indexer" in name, name
            continue
        scale = max(np.abs(want).max(), 1e-8)
        assert np.abs(got - want).max() <= 5e-5 * scale, (name, np.abs(got - want).max(), scale)
        compared += 1
    assert compared > 20


def _flat_like(tree, like):
    """Leaves of `tree` in the order of `like`'s leaves (None where `tree` lacks that path)."""
    flat = {tuple(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return [flat.get(tuple(str(getattr(k, "key", k)) for k in kp))
            for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
