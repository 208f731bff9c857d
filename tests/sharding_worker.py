"""Worker for tests/test_sharding_layouts.py: runs on 8 simulated CPU devices in its own process.

The device-count flag must be set before jax is imported, and the rest of the suite assumes one device,
so the test launches this script as a subprocess. One process checks every layout (compiles dominate).
For each mesh layout it computes logits and parameter gradients of the tiny V3.2 model (sequence longer
than index_topk, so DSA prunes) with `sharding.forward_with_aux` under jit, and the same on one device
with plain `dsjax`; it records the differences, the params' shardings and per-device shard shapes.
Results go to the JSON file named by argv[1]; the test makes the assertions.

    python tests/sharding_worker.py OUT.json [layout_name ...]
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           # halves XLA:CPU compile time; numerics stay fp32
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsjax  # noqa: E402
import sharding  # noqa: E402
from dsjax import fp8, model  # noqa: E402

LAYOUTS = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "expert4_tensor2": dict(expert=4, tensor=2),
    "sequence4_expert2": dict(sequence=4, expert=2),
    "data2_sequence2_expert2": dict(data=2, sequence=2, expert=2),
}
# Leaves whose sharding and per-device shape the test checks.
WATCH = {
    "embed": ("embed",),
    "wq_a": ("dense", "attn", "wq_a"),
    "wq_b": ("moe", "attn", "wq_b"),
    "wo": ("moe", "attn", "wo"),
    "experts_gate": ("moe", "moe", "experts", "gate"),
    "experts_down": ("moe", "moe", "experts", "down"),
    "router": ("moe", "moe", "router"),
    "lm_head": ("lm_head",),
}
CFG = dsjax.Config.preset("tiny")
B, T = 8, 128  # T > index_topk = 64: the indexer prunes


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _loss_fn(forward, ct):
    def loss(p, tokens):
        logits = forward(p, tokens)
        return jnp.mean(logits * ct), logits

    return jax.value_and_grad(loss, has_aux=True)


def _errors(got, ref):
    flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_r = jax.tree.leaves(ref)
    return {jax.tree_util.keystr(k): float(np.max(np.abs(np.asarray(g) - np.asarray(r)))
                                            / (np.max(np.abs(np.asarray(r))) + 1e-30))
            for (k, g), r in zip(flat_g, flat_r)}


def to_fp8(params, paths):
    """Replace the leaves at `paths` by FP8 {qweight [..., in, out], scale} storage (host quantisation)."""
    specs = dsjax.param_specs(CFG)
    out = jax.tree.map(lambda x: x, params)
    for path in paths:
        spec = _get(specs, path)
        w = np.asarray(_get(params, path), np.float32)
        lead = 2 if "experts" in path else 1  # stacked layers (and experts)
        n_in = 2 if path[-1] == "wo" else 1
        rows = int(np.prod(spec.shape[lead:lead + n_in]))
        cols = int(np.prod(spec.shape[lead + n_in:]))
        mats = w.reshape(-1, rows, cols)
        qs, ss = zip(*(fp8.quantize_weight(m) for m in mats))
        q = np.stack(qs).reshape(w.shape[:lead] + qs[0].shape)
        s = np.stack(ss).reshape(w.shape[:lead] + ss[0].shape)
        _get(out, path[:-1])[path[-1]] = {"qweight": jnp.asarray(q), "scale": jnp.asarray(s)}
    return out


FP8_LAYOUT = "expert4_tensor2"
FP8_PATHS = [("moe", "moe", "experts", "gate"), ("moe", "moe", "experts", "up"), ("moe", "moe", "experts", "down"),
             ("moe", "attn", "wo"), ("dense", "attn", "wq_b")]


def fp8_check(params, tokens) -> dict:
    """FP8-stored weights through the public `dsjax.forward(..., parallel=)` against the same FP8 params on
    one device: the rules must place {qweight, scale} leaves and EP must dequantise them per shard."""
    q = to_fp8(params, FP8_PATHS)
    ref = dsjax.forward(q, tokens, CFG)
    mesh = sharding.make_mesh(**LAYOUTS[FP8_LAYOUT], config=CFG)
    got = dsjax.forward(q, tokens, CFG, parallel=sharding.MeshParallelism(mesh))
    placed = sharding.shard_params(q, CFG, mesh)
    leaf = _get(placed, FP8_PATHS[0])
    return {"logits_err": float(jnp.max(jnp.abs(got - ref))), "max_logit": float(jnp.max(jnp.abs(ref))),
            "qweight_spec": str(leaf["qweight"].sharding.spec), "scale_spec": str(leaf["scale"].sharding.spec),
            "qweight_shard": list(leaf["qweight"].addressable_shards[0].data.shape),
            "qweight_dtype": str(leaf["qweight"].dtype)}


def ep_check(params) -> dict:
    """One MoE layer on an expert=4 x tensor=2 mesh with 30 tokens (not a multiple of the 4 token shards:
    padding path), for each exchange implementation, against the local dropless dispatch. The "ragged"
    collective cannot run on XLA:CPU: it is lowered (not compiled) and the "emulated" implementation, which
    has its semantics, checks the offsets bookkeeping."""
    from dsjax import moe

    mesh = sharding.make_mesh(**LAYOUTS[FP8_LAYOUT], config=CFG)
    p = jax.tree.map(lambda a: a[0], params["moe"]["moe"])
    x = jax.random.normal(jax.random.key(3), (2, 15, CFG.hidden_size))
    ct = jax.random.normal(jax.random.key(4), x.shape)
    ref, _ = jax.jit(lambda p, x: moe.moe(p, x, CFG))(p, x)
    ref_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.moe(p, x, CFG)[0] * ct), argnums=(0, 1)))(p, x)
    out: dict = {}
    # chunked: a 16 KiB buffer bound holds 4 tokens' worst case (ep=4 x min(k, E/ep)=2 x D=128 x 4 B each),
    # so each device's 8 tokens go through the exchange in 2 rematerialised chunks
    cases = {"padded": ("padded", 1 << 29), "emulated": ("emulated", 1 << 29),
             "padded_chunked": ("padded", 16 << 10), "ragged": ("ragged", 1 << 29)}
    for name, (impl, buf) in cases.items():
        def f(p, x, impl=impl, buf=buf):
            par = sharding.MeshParallelism(mesh, ep_impl=impl, ep_buffer_bytes=buf)
            return moe.moe(p, x, CFG, par)[0]
        if impl == "ragged":
            text = jax.jit(f).lower(p, x).as_text()
            out["ragged_lowered"] = "ragged_all_to_all" in text
            continue
        out[name + "_err"] = float(jnp.max(jnp.abs(jax.jit(f)(p, x) - ref)))
        if name == "padded_chunked":
            g = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * ct), argnums=(0, 1)))(p, x)
            out["chunked_grad_rel_err"] = max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grad)))
            loops = lambda fn: jax.jit(fn).lower(p, x).as_text().count("stablehlo.while")
            out["chunked_extra_loops"] = loops(f) - loops(functools.partial(f, buf=1 << 29))
    out["max_out"] = float(jnp.max(jnp.abs(ref)))
    # Official numerics with FP8 experts: expert parallelism dequantises its shards, but must still quantise
    # the experts' inputs (UE8M0) and round gate/up as the local path does.
    off = CFG.replace(indexer_numerics="official_fp8")
    q = to_fp8({"moe": {"moe": {"experts": params["moe"]["moe"]["experts"]}}},
               [("moe", "moe", "experts", n) for n in ("gate", "up", "down")])["moe"]["moe"]["experts"]
    p8 = {**p, "experts": jax.tree.map(lambda a: a[0], q)}
    local = jax.jit(lambda p, x: moe.moe(p, x, off)[0])(p8, x)
    plain = jax.jit(lambda p, x: moe.moe(p, x, CFG)[0])(p8, x)
    par = sharding.MeshParallelism(sharding.make_mesh(data=2, expert=4, config=CFG), ep_impl="padded")
    ep = jax.jit(lambda p, x: moe.moe(p, x, off, par)[0])(p8, x)
    out["official_ep_err"] = float(jnp.max(jnp.abs(ep - local)))
    out["official_vs_plain"] = float(jnp.max(jnp.abs(plain - local)))
    return out


CACHE_LAYOUT = "sequence4_expert2"


def cache_check(params, tokens) -> dict:
    """Prefill of T tokens into a 2T-slot KV cache split over `sequence` (cache_shardings), under
    `sharding.MeshParallelism`: the cached latents are all-gathered per layer; hidden states and the written
    cache must equal one device's."""
    from dsjax import cache as cache_lib

    mesh = sharding.make_mesh(**LAYOUTS[CACHE_LAYOUT], config=CFG)
    empty = cache_lib.init_cache(CFG, B, 2 * T)
    run = lambda p, t, c: model.forward_hidden(p, t, CFG, cache=c)
    ref = jax.jit(run)(params, tokens, empty)

    def sharded(p, t, c):
        return model.forward_hidden(p, t, CFG, cache=c, parallel=sharding.MeshParallelism(mesh))

    c_sh = sharding.cache_shardings(empty, mesh)
    got = jax.jit(sharded)(sharding.shard_params(params, CFG, mesh),
                           sharding.put(tokens, sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape)),
                           jax.tree.map(sharding.put, empty, c_sh))
    leaf = jax.tree.leaves(c_sh)[0]
    return {"hidden_err": float(jnp.max(jnp.abs(got.hidden - ref.hidden))),
            "cache_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got.cache),
                                                                             jax.tree.leaves(ref.cache))),
            "cache_spec": str(leaf.spec), "max_hidden": float(jnp.max(jnp.abs(ref.hidden)))}


def trap_check(params, tokens) -> dict:
    """One jitted function (the public `forward_with_aux`), first traced without a layout, then called with
    one: the layout is a static argument, so the second call must trace again and run expert- and
    context-parallel (the shard_map collectives in its HLO), giving the sharded result."""
    mesh = sharding.make_mesh(**LAYOUTS[CACHE_LAYOUT], config=CFG)
    par = sharding.MeshParallelism(mesh)
    fn = jax.jit(dsjax.forward_with_aux, static_argnames=("config", "parallel"))
    plain = fn(params, tokens, config=CFG)[0]
    text_plain = fn.lower(params, tokens, config=CFG).as_text()
    ps = sharding.shard_params(params, CFG, mesh)
    tk = sharding.put(tokens, sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape))
    got = fn(ps, tk, config=CFG, parallel=par)[0]
    text = fn.lower(ps, tk, config=CFG, parallel=par).compile().as_text()  # op_name metadata: the scopes
    count = lambda t, op: t.count(op) + t.count(op.replace("_", "-"))  # StableHLO or HLO spelling
    return {"err": float(jnp.max(jnp.abs(got - plain))), "max_logit": float(jnp.max(jnp.abs(plain))),
            "all_to_all": count(text, "all_to_all"), "all_gather": count(text, "all_gather"),
            "plain_collectives": count(text_plain, "all_to_all") + count(text_plain, "all_gather"),
            "named_scopes": sorted({s for s in ("attention", "moe_dispatch", "moe_route", "sparse_mla",
                                                "indexer_topk", "lm_head") if f"/{s}" in text})}


def main(out_path: str, names: list[str]) -> None:
    res: dict = {"layouts": {}, "timing": {}}
    params = dsjax.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    ct = jax.random.normal(jax.random.key(2), (B, T, CFG.vocab_size))
    t0 = time.time()
    # Every layout replays the reference's discrete choices (DSA keys, MoE routing): another summation order
    # flips near ties, and one flipped key or expert moves the logits by ~1% (tests/test_train_mesh.py).
    sel = jax.jit(lambda p, tk: model.forward_with_aux(p, tk, CFG, record_selection=True)[1].selection)(
        params, tokens)
    ref_step = jax.jit(_loss_fn(lambda p, tk: model.forward_with_aux(p, tk, CFG, selection=sel)[0], ct))
    (ref_loss, ref_logits), ref_grads = ref_step(params, tokens)
    res["timing"]["reference"] = time.time() - t0
    res["reference_max_logit"] = float(jnp.max(jnp.abs(ref_logits)))
    for name in names:
        t0 = time.time()
        mesh = sharding.make_mesh(**LAYOUTS[name], config=CFG)
        ps = sharding.shard_params(params, CFG, mesh)
        tk = sharding.put(tokens, sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape))
        # a training step would ask for gradients laid out like the params (FSDP: reduce-scattered)
        outs = ((sharding.logical_to_sharding((), mesh),
                 sharding.logical_to_sharding(sharding.LOGITS_AXES, mesh, ref_logits.shape)),
                sharding.param_shardings(CFG, mesh))
        step = jax.jit(_loss_fn(lambda p, t, mesh=mesh: sharding.forward_with_aux(p, t, CFG, mesh,
                                                                                 selection=sel)[0], ct),
                       out_shardings=outs)
        (loss, logits), grads = step(ps, tk)
        r = {}
        if LAYOUTS[name].get("sequence", 1) > 1:  # the layout's own choices (gathered index keys): near-equal
            own = jax.jit(lambda p, t, mesh=mesh: sharding.forward_with_aux(p, t, CFG, mesh,
                                                                            record_selection=True)[1].selection)(ps, tk)
            r["own_selection_agree"] = {k: float(np.mean(np.all(np.sort(np.asarray(own[k]), -1)
                                                                == np.sort(np.asarray(sel[k]), -1), -1)))
                                        for k in sel}
        r |= {
            "logits_err": float(jnp.max(jnp.abs(logits - ref_logits))),
            "loss": float(loss), "ref_loss": float(ref_loss),
            "grad_rel_err": _errors(grads, ref_grads),
            "logits_spec": str(logits.sharding.spec),
            "specs": {k: str(_get(ps, p).sharding.spec) for k, p in WATCH.items()},
            "shard_shapes": {k: list(_get(ps, p).addressable_shards[0].data.shape) for k, p in WATCH.items()},
            "full_shapes": {k: list(_get(ps, p).shape) for k, p in WATCH.items()},
            "grad_specs": {k: str(_get(grads, p).sharding.spec) for k, p in WATCH.items()},
        }
        res["layouts"][name] = r
        res["timing"][name] = time.time() - t0
    if FP8_LAYOUT in names:
        t0 = time.time()
        res["fp8"] = fp8_check(params, tokens)
        res["timing"]["fp8"] = time.time() - t0
        t0 = time.time()
        res["ep"] = ep_check(params)
        res["timing"]["ep"] = time.time() - t0
    if CACHE_LAYOUT in names:
        t0 = time.time()
        res["cache"] = cache_check(params, tokens)
        res["timing"]["cache"] = time.time() - t0
        t0 = time.time()
        res["trap"] = trap_check(params, tokens)
        res["timing"]["trap"] = time.time() - t0
    json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(LAYOUTS))
