"""Sharding rules, mesh checks and placement, evaluated on abstract meshes in this (1-device) process.

The layouts that need real devices (logits and gradients against one device, per-device shard shapes)
are in test_sharding_layouts.py, which runs 8 simulated CPU devices in a subprocess.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import dsjax
import sharding
from sharding.placement import fp8_matrix_axes

V32 = dsjax.Config.preset("deepseek-v3.2")
TINY = dsjax.Config.preset("tiny")


def amesh(**sizes) -> AbstractMesh:
    """An abstract mesh with dsjax's axes (sizes default 1): rules can be evaluated without devices."""
    return AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _axes_of(spec):
    out = []
    for e in spec:
        out += [] if e is None else [e] if isinstance(e, str) else list(e)
    return out


@pytest.mark.parametrize("preset", ["deepseek-v3.2", "deepseek-v3", "tiny", "tiny-v3"])
def test_every_logical_axis_has_a_rule_naming_only_mesh_axes(preset):
    axes = jax.tree.leaves(dsjax.param_axes(dsjax.Config.preset(preset)), is_leaf=lambda x: isinstance(x, tuple))
    for name in {a for t in axes for a in t}:
        assert set(sharding.rules.mesh_axes_for(name)) <= set(sharding.MESH_AXES), name
    for rule in sharding.RULES.values():
        assert set(rule) <= set(sharding.MESH_AXES)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("not_an_axis",), amesh())


def test_671b_on_expert64_fsdp4_splits_experts_and_fsdps_the_rest():
    m = amesh(expert=64, fsdp=4)
    ps = sharding.param_shardings(V32, m)
    assert ps["moe"]["moe"]["experts"]["gate"].spec == P(None, "expert", "fsdp")  # [L, E, D, F]
    assert ps["moe"]["moe"]["experts"]["down"].spec == P(None, "expert", None, "fsdp")  # [L, E, F, D]
    assert ps["embed"].spec == P(None, ("fsdp", "expert"))  # D = 7168 over 256 devices
    assert ps["moe"]["attn"]["wo"].spec == P(None, None, None, ("fsdp", "expert"))
    # no mesh axis appears twice in one array's spec, for any leaf
    for s in jax.tree.leaves(ps):
        used = _axes_of(s.spec)
        assert len(used) == len(set(used)), s.spec


def test_split_falls_back_to_a_dividing_prefix_of_the_rule():
    m = amesh(data=2, fsdp=4)
    assert sharding.logical_to_spec(sharding.TOKEN_AXES, m, (8, 16)) == P(("data", "fsdp"))
    assert sharding.logical_to_spec(sharding.TOKEN_AXES, m, (2, 16)) == P("data")  # fsdp=4 no longer divides
    assert sharding.logical_to_spec(sharding.TOKEN_AXES, m, (1, 16)) == P()  # batch 1 (decode): replicated
    # vocab 129280 = 2^8 * 505: tensor=512 does not divide it (replicated), tensor=256 does
    assert sharding.logical_to_spec(("vocab",), amesh(tensor=512), (129280,)) == P()
    assert sharding.logical_to_spec(("vocab",), amesh(tensor=256), (129280,)) == P("tensor")


def test_bad_meshes_give_one_clear_error():
    with pytest.raises(ValueError, match=r"n_routed_experts=8 is not divisible by expert=3"):
        sharding.check_mesh(TINY, amesh(expert=3))
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by tensor=8"):
        sharding.check_mesh(TINY, amesh(tensor=8))
    with pytest.raises(ValueError) as e:  # every problem in one message
        sharding.check_mesh(TINY, amesh(expert=3, tensor=8))
    assert "n_routed_experts" in str(e.value) and "num_attention_heads" in str(e.value)
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {8 * n} devices, but {n} are given"):
        sharding.make_mesh(data=2, expert=4 * n)
    with pytest.raises(ValueError, match="must be a positive integer"):
        sharding.make_mesh(data=0)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.param_shardings(TINY, amesh(expert=16))


def test_make_mesh_has_all_axes():
    m = sharding.make_mesh(config=TINY)
    assert m.axis_names == sharding.MESH_AXES and m.size == len(jax.devices())


def test_mesh_specs_from_the_command_line():
    assert sharding.parse_mesh_sizes("expert=8, tensor=2") == {"expert": 8, "tensor": 2}
    assert sharding.parse_mesh_sizes("") == {} and sharding.mesh_from_spec("") is None
    for bad, why in [("expert8", "is not axis=size"), ("expert=x", "is not axis=size"),
                     ("model=2", "names an unknown axis"), ("data=1,data=1", "is repeated")]:
        with pytest.raises(ValueError, match=why) as e:
            sharding.parse_mesh_sizes(bad)
        assert "data, fsdp, sequence, expert, tensor" in str(e.value)
    n = len(jax.devices())
    m = sharding.mesh_from_spec(f"data={n}", config=TINY)
    assert m.shape["data"] == n and m.axis_names == sharding.MESH_AXES
    with pytest.raises(ValueError, match=rf"needs {3 * n} devices"):
        sharding.mesh_from_spec(f"data={n},tensor=3", config=TINY)


def test_zigzag_order_is_a_permutation_that_balances_causal_work():
    for t, sp in [(128, 4), (64, 2), (4096, 8)]:
        order = sharding.zigzag_order(t, sp)
        assert sorted(order.tolist()) == list(range(t))
        work = (order + 1).reshape(sp, -1).sum(axis=1)  # keys seen per shard (causal)
        assert np.all(work == work[0]), work
        contiguous = (np.arange(t) + 1).reshape(sp, -1).sum(axis=1)
        assert contiguous[-1] > 2 * contiguous[0]  # what the zig-zag avoids
    assert sharding.zigzag_order(128, 1) is None and sharding.zigzag_order(100, 4) is None


def test_opt_state_mirrors_params_and_replicates_counts():
    m = amesh(expert=64, fsdp=4)
    ps = sharding.param_shardings(V32, m)
    state = jax.eval_shape(optax.adamw(1e-3).init, dsjax.abstract_params(V32))
    ss = sharding.opt_state_shardings(state, V32, m)
    adam = ss[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(ps)
    assert all(a.spec == b.spec for a, b in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(ps)))
    assert all(a.spec == b.spec for a, b in zip(jax.tree.leaves(adam.nu), jax.tree.leaves(ps)))
    assert adam.count.spec == P()


def test_cache_shardings_split_batch_and_length():
    from dsjax import cache as cache_lib

    cache = jax.eval_shape(lambda: cache_lib.init_cache(TINY, 8, 256))
    cs = sharding.cache_shardings(cache, amesh(data=2, expert=2, sequence=2))
    for s in jax.tree.leaves(cache_lib.layer_caches(cs)):
        assert s.spec == P(None, ("data", "expert"), "sequence")
    assert cs["lengths"].spec == P(("data", "expert"))


def test_fp8_leaves_split_like_their_matrix_scales_where_they_divide():
    spec = dsjax.param_specs(V32)["moe"]["attn"]["wo"]  # [L, H, dv, D] stored as qweight [L, H*dv, D]
    l, h, dv, d = spec.shape
    leaf = {"qweight": jax.ShapeDtypeStruct((l, h * dv, d), np.dtype("float8_e4m3fn")),
            "scale": jax.ShapeDtypeStruct((l, h * dv // 128, d // 128), np.float32)}
    assert fp8_matrix_axes(spec, leaf["qweight"].shape) == (("layers", "heads", "embed"), (l, h, d))
    like = jax.tree.map(lambda x: x, dsjax.abstract_params(V32))
    like["moe"]["attn"]["wo"] = leaf
    s = sharding.param_shardings(V32, amesh(tensor=8, fsdp=4), like=like)["moe"]["attn"]["wo"]
    assert s["qweight"].spec == P(None, "tensor", "fsdp") and s["scale"].spec == s["qweight"].spec
    # D = 7168 over expert=16 is 448 columns: qweight still split; the 56-column scale grid is not (56 % 16)
    s = sharding.param_shardings(V32, amesh(expert=16), like=like)["moe"]["attn"]["wo"]
    assert s["qweight"].spec == P(None, None, "expert") and s["scale"].spec == P()
    e = dsjax.param_specs(V32)["moe"]["moe"]["experts"]["gate"]  # [L, E, D, F]
    like["moe"]["moe"]["experts"]["gate"] = {
        "qweight": jax.ShapeDtypeStruct(e.shape, np.dtype("float8_e4m3fn")),
        "scale": jax.ShapeDtypeStruct(e.shape[:2] + (e.shape[2] // 128, e.shape[3] // 128), np.float32)}
    s = sharding.param_shardings(V32, amesh(tensor=32, expert=8), like=like)["moe"]["moe"]["experts"]["gate"]
    assert s["qweight"].spec == P(None, "expert", None, "tensor")
    assert s["scale"].spec == P(None, "expert")  # 16 scale columns over tensor=32: whole


def test_expert_exchange_chunks_fit_the_buffer_bound():
    from sharding.expert_parallel import chunk_tokens

    # worst case per token: ep x min(k, E/ep) rows of D values
    assert chunk_tokens(TINY, 4, 4, 16 << 10) == 16384 // (4 * 2 * 128 * 4)
    per_token = 64 * 4 * 7168 * 2  # 671B on expert=64, bf16: 3.67 MB of worst-case buffer per token
    assert chunk_tokens(V32, 64, 2, 1 << 29) == (1 << 29) // per_token
    assert chunk_tokens(V32, 64, 2, 1) == 1
