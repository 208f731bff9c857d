"""checkpoints.load onto a mesh: every array restored straight into its target sharding (8 simulated
CPU devices in a subprocess, since the device count is fixed when jax starts)."""

import os
import subprocess
import sys

import checkpoint_helpers as C
import hf_reference as H
from checkpoints import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import checkpoints, sharding
from dsjax.params import ParamSpec, param_specs

plain, kept = sys.argv[1:3]
assert len(jax.devices()) == 8
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
RULES = {"exp": "model", "heads": "model", "mlp": "model", "vocab": "model", "index_heads": "model",
         "embed": "data", "q_lora": "data", "kv_lora": "data"}

def spec_of(s):
    out, used = [], set()
    for ax, n in zip(s.axes, s.shape):
        m = RULES.get(ax)
        ok = m is not None and m not in used and n % mesh.shape[m] == 0
        out.append(m if ok else None)
        used |= {m} if ok else set()
    return P(*out)

cfg, ref = checkpoints.load(plain)  # one device
sh = jax.tree.map(lambda s: NamedSharding(mesh, spec_of(s)), param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))

def check(got, want, sharding_tree):
    n_sharded = 0
    for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(sharding_tree)):
        assert g.sharding == s, (g.sharding, s)
        assert g.dtype == w.dtype and g.shape == w.shape
        w = np.asarray(w)
        for shard in g.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
        n_sharded += not g.sharding.is_fully_replicated
    return n_sharded

_, got = checkpoints.load(plain, shardings=sh)
n = check(got, ref, sh)
assert n > 20, n
print("plain sharded leaves:", n)

# mesh only: the sharding package's rules when it has them, else replicated
_, got = checkpoints.load(plain, mesh=mesh)
if hasattr(sharding, "param_shardings"):
    check(got, ref, sharding.param_shardings(cfg, mesh))
else:
    assert all(x.sharding.is_fully_replicated and x.sharding.mesh == mesh for x in jax.tree.leaves(got))

# FP8 leaves: shardings derived from the logical leaf's
cfg_k, ref_k = checkpoints.load(kept)
_, got_k = checkpoints.load(kept, shardings=sh)
is_pair = lambda x: isinstance(x, dict) and "qweight" in x
specs = {
    ("moe", "attn", "wo"): (P(None, "model", "data"), P(None, None, None)),
    ("moe", "attn", "wq_b"): (P(None, "data", "model"), P(None, None, None)),
    ("moe", "moe", "experts", "down"): (P(None, "model", None, None), P(None, "model", None, None)),
    ("dense", "mlp", "gate"): (P(None, "data", "model"), P(None, None, None)),
    ("mtp", "block", "attn", "wkv_b"): (P("data", "model"), P(None, None)),
}
for path, (q, s) in specs.items():
    leaf = got_k
    for k in path:
        leaf = leaf[k]
    assert leaf["qweight"].sharding.spec == q, (path, leaf["qweight"].sharding.spec)
    assert leaf["scale"].sharding.spec == s, (path, leaf["scale"].sharding.spec)
want_sh = jax.tree.map(lambda x: x.sharding, got_k)
check(got_k, ref_k, want_sh)
print("OK")
'''


def test_restore_into_target_shardings(tmp_path):
    src = H.save(H.build_hf_model("v32", seed=7, **C.FP8_MODEL), str(tmp_path / "fp32"))
    fp8_dir, _ = C.fp8_checkpoint(src, str(tmp_path / "fp8"), str(tmp_path / "ref"), mtp=True)
    convert.convert(fp8_dir, tmp_path / "plain", dtype="bfloat16", progress=False)
    convert.convert(fp8_dir, tmp_path / "kept", dtype="bfloat16", keep_fp8=True, progress=False)
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "plain"), str(tmp_path / "kept")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-3000:], r.stderr[-5000:])
