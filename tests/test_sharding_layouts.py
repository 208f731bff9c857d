"""Every mesh layout of the tiny V3.2 model (DSA active) on 8 simulated CPU devices equals one device:
logits and all parameter gradients, params really split (per-device shapes), FP8 leaves, one MoE layer per
expert-parallel exchange, and prefill into a sequence-split KV cache.

The 8-device flag must be set before jax is imported and the rest of the suite runs on one device, so a
worker subprocess (tests/sharding_worker.py) computes everything once; these tests assert on its report.
"""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 1500

# Per-device shard shapes expected from the rules (tiny: V=512, D=128, Rq=64, H=4, qk=48, dv=32, E=8, F=64;
# 2 dense + 2 MoE layers). Full shapes: embed [512,128], wq_a [2,128,64], wq_b [2,64,4,48],
# wo [2,4,32,128], experts gate [2,8,128,64], down [2,8,64,128], router [2,128,8], lm_head [128,512].
FULL = {"embed": [512, 128], "wq_a": [2, 128, 64], "wq_b": [2, 64, 4, 48], "wo": [2, 4, 32, 128],
        "experts_gate": [2, 8, 128, 64], "experts_down": [2, 8, 64, 128], "router": [2, 128, 8],
        "lm_head": [128, 512]}
EXPECTED = {
    "data8": (dict(FULL), str(P("data"))),  # pure data parallel: params replicated
    "fsdp8": ({"embed": [512, 16], "wq_a": [2, 16, 64], "wq_b": [2, 8, 4, 48], "wo": [2, 4, 32, 16],
               "experts_gate": [2, 8, 16, 64], "experts_down": [2, 8, 64, 16], "router": [2, 16, 8],
               "lm_head": [16, 512]}, str(P("fsdp"))),
    "expert4_tensor2": ({"embed": [256, 32], "wq_a": [2, 32, 64], "wq_b": [2, 16, 2, 48], "wo": [2, 2, 32, 32],
                         "experts_gate": [2, 2, 128, 32], "experts_down": [2, 2, 32, 128], "router": [2, 32, 8],
                         "lm_head": [32, 256]}, str(P("expert", None, "tensor"))),
    "sequence4_expert2": ({"embed": [512, 16], "wq_a": [2, 16, 64], "wq_b": [2, 8, 4, 48], "wo": [2, 4, 32, 16],
                           "experts_gate": [2, 4, 128, 64], "experts_down": [2, 4, 64, 128], "router": [2, 16, 8],
                           "lm_head": [16, 512]}, str(P("expert", "sequence"))),
    "data2_sequence2_expert2": ({"embed": [512, 32], "wq_a": [2, 32, 64], "wq_b": [2, 16, 4, 48],
                                 "wo": [2, 4, 32, 32], "experts_gate": [2, 4, 128, 64],
                                 "experts_down": [2, 4, 64, 128], "router": [2, 32, 8], "lm_head": [32, 512]},
                                str(P(("data", "expert"), "sequence"))),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sharding worker did not finish in {TIMEOUT_S}s")
    if proc.returncode:
        pytest.fail(f"sharding worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_layout_matches_one_device(report, layout):
    r = report["layouts"][layout]
    assert r["logits_err"] <= 1e-5 * max(1.0, report["reference_max_logit"]), r["logits_err"]
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-6  # mean(logits * cotangent): O(1) terms cancelling
    worst = max(r["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, worst  # every parameter's gradient, relative to its largest entry
    assert len(r["grad_rel_err"]) > 40  # all leaves were compared
    assert ("own_selection_agree" in r) == ("sequence" in layout)
    if "own_selection_agree" in r:  # sequence split: its own keys and routing, flip-tolerantly the reference's
        assert set(r["own_selection_agree"]) == {"dense", "moe", "moe_experts"}, r["own_selection_agree"]
        assert min(r["own_selection_agree"].values()) >= 0.97, r["own_selection_agree"]


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_params_are_really_split(report, layout):
    shapes, logits_spec = EXPECTED[layout]
    r = report["layouts"][layout]
    assert r["full_shapes"] == FULL
    assert r["shard_shapes"] == shapes, r["specs"]
    assert r["logits_spec"] == logits_spec
    assert r["grad_specs"] == r["specs"]  # gradients come back laid out like the params


def test_fp8_weights_through_public_forward(report):
    r = report["fp8"]
    assert r["qweight_dtype"] == "float8_e4m3fn"
    # F = 64 split over tensor=2; its scale grid (one 128-block) stays whole
    assert r["qweight_spec"] == str(P(None, "expert", None, "tensor"))
    assert r["scale_spec"] == str(P(None, "expert"))
    assert r["qweight_shard"] == [2, 2, 128, 32]
    assert r["logits_err"] <= 1e-5 * max(1.0, r["max_logit"])


def test_expert_parallel_exchanges_equal_local_dispatch(report):
    r = report["ep"]
    assert r["padded_err"] <= 1e-6 * max(1.0, r["max_out"])
    assert r["emulated_err"] <= 1e-6 * max(1.0, r["max_out"])  # ragged bookkeeping, ragged semantics
    assert r["padded_chunked_err"] <= 1e-6 * max(1.0, r["max_out"])
    assert r["chunked_extra_loops"] == 1  # the chunk scan really ran
    assert r["chunked_grad_rel_err"] < 1e-5  # gradients through the chunked exchange (x and all weights)
    assert r["ragged_lowered"]  # TPU/GPU path lowers (XLA:CPU cannot compile ragged-all-to-all)
    # official numerics through expert parallelism equal the local official path, which differs from plain
    assert r["official_ep_err"] <= 1e-6 * max(1.0, r["max_out"]), r["official_ep_err"]
    assert r["official_vs_plain"] > 100 * max(r["official_ep_err"], 1e-9), r


def test_prefill_into_sequence_split_cache(report):
    r = report["cache"]
    assert r["cache_spec"] == str(P(None, "expert", "sequence"))
    assert r["hidden_err"] <= 1e-5 * max(1.0, r["max_hidden"])
    assert r["cache_err"] <= 1e-5 * max(1.0, r["max_hidden"])


def test_layout_is_an_argument_not_ambient_state(report):
    """A function traced without a layout and then called with one is traced again for it (the layout is
    part of the jit key): it runs expert-parallel (all-to-all) and context-parallel (all-gather of the
    latents), with named scopes in its HLO, and equals the one-device result."""
    r = report["trap"]
    assert r["plain_collectives"] == 0
    assert r["all_to_all"] > 0 and r["all_gather"] > 0, r
    assert r["err"] <= 1e-5 * max(1.0, r["max_logit"]), r
    assert r["named_scopes"] == sorted(["attention", "moe_dispatch", "moe_route", "sparse_mla", "indexer_topk",
                                        "lm_head"]), r["named_scopes"]
