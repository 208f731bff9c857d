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

# mesh only: the sharding package's rules on a dsjax mesh
dmesh = sharding.make_mesh(fsdp=2, expert=4)
_, got = checkpoints.load(plain, parallel=sharding.MeshParallelism(dmesh))
assert check(got, ref, sharding.param_shardings(cfg, dmesh)) > 20

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
    env = dict(os.environ, PYTHONPATH=ROOT,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "plain"), str(tmp_path / "kept")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-3000:], r.stderr[-5000:])


HOST_SCRIPT = r'''
import json, os, sys
pid, port, ckpt, saved = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import checkpoints
from dsjax.params import ParamSpec, param_specs

def rchar():  # bytes this process has read through read/pread syscalls
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])

mesh = Mesh(np.array(jax.devices()), ("x",))  # 8 devices: 4 in each process
from checkpoints import orbax_io, restore
cfg = restore.config_from_marker(orbax_io.read_marker(ckpt))
rep = NamedSharding(mesh, P())
by_expert = lambda s: NamedSharding(mesh, P(*[("x" if a == "exp" else None) for a in s.axes]))
specs = param_specs(cfg)
is_spec = lambda x: isinstance(x, ParamSpec)
sharded = jax.tree.map(lambda s: by_expert(s) if "exp" in s.axes else rep, specs, is_leaf=is_spec)
replicated = jax.tree.map(lambda s: rep, specs, is_leaf=is_spec)

checkpoints.load(ckpt, shardings=replicated)  # warm-up: Orbax / OCDBT metadata reads are not counted
r0 = rchar()
_, p = checkpoints.load(ckpt, shardings=sharded)
r1 = rchar()
_, full = checkpoints.load(ckpt, shardings=replicated)
r2 = rchar()
ok = True
for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(full)):
    b = np.asarray(b.addressable_shards[0].data)
    for s in a.addressable_shards:
        ok &= bool(np.array_equal(np.asarray(s.data), b[s.index]))
experts = p["moe"]["moe"]["experts"]["gate"]
mine = sorted({e for s in experts.addressable_shards for e in range(*s.index[1].indices(experts.shape[1]))})
checkpoints.save(saved, p, cfg)  # every process writes its own shards; process 0 commits
print(json.dumps({"sharded": r1 - r0, "replicated": r2 - r1, "ok": ok, "experts": mine}), flush=True)
'''


def test_multihost_each_process_reads_only_its_shards(tmp_path):
    """Two real processes (jax.distributed, 4 CPU devices each) restore a checkpoint whose experts are
    sharded across both: each reads only its own experts' chunks, and `save` writes it back."""
    import json
    import socket

    import jax
    import numpy as np

    import checkpoints
    from checkpoints import synthetic

    cfg = synthetic.wide_config(n_routed_experts=32, num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                moe_intermediate_size=128, vocab_size=1024, q_lora_rank=128, kv_lora_rank=64,
                                index_n_heads=4)
    synthetic.write(tmp_path / "hf", cfg)
    convert.convert(tmp_path / "hf", tmp_path / "ckpt", compress=False, progress=False)
    expert_bytes = 3 * 32 * 256 * 128 * 2
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    args = [str(port), str(tmp_path / "ckpt"), str(tmp_path / "saved")]
    procs = [subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, str(i)] + args, cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-5000:]
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert res[0]["experts"] == list(range(16)) and res[1]["experts"] == list(range(16, 32))
    for r in res:
        assert r["ok"]
        # the replicated restore reads all the experts; the sharded one only this process' half
        assert r["replicated"] > expert_bytes
        assert r["sharded"] < r["replicated"] - 0.45 * expert_bytes, r
    cfg_a, a = checkpoints.load(tmp_path / "ckpt")
    cfg_b, b = checkpoints.load(tmp_path / "saved")
    assert cfg_a == cfg_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
