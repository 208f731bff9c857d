"""Training on a device mesh (8 simulated CPU devices, in a subprocess so the rest of the suite keeps one
device): the sharded step gives the single-device update, and optimizer moments live where their params do."""

import os
import subprocess
import sys

import pytest

import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys
sys.path.insert(0, "tests")
import dataclasses
import jax, jax.numpy as jnp, numpy as np
import dsjax, sharding
from dsjax.train import step as S, trainer
from test_train import CFG, TC, make_batch

tc = dataclasses.replace(TC, grad_accum=1)
params = dsjax.init_params(CFG, jax.random.key(0))
batch = make_batch(seed=3, b=8)

def two_steps(mesh):
    st = S.init_state(jax.tree.map(jnp.copy, params), CFG, tc, jax.random.key(1))
    st = trainer.place_state(st, CFG, mesh)
    fn = S.compiled_step(CFG, tc, mesh)
    for _ in range(2):  # the first step has lr = 0 (warm-up): the second one moves the params
        st, m = fn(st, trainer.place_batch(batch, mesh))
    return st, m

ref, m_ref = two_steps(None)
mesh = sharding.make_mesh(fsdp=8, config=CFG)
new, m = two_steps(mesh)
assert abs(float(m["loss"]) - float(m_ref["loss"])) <= 1e-5 * abs(float(m_ref["loss"])), (m["loss"], m_ref["loss"])
err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref["params"])))
assert err < 1e-5, err
w = new["params"]["moe"]["moe"]["experts"]["gate"]
mu = new["opt_state"][1][0].mu["params"]["moe"]["moe"]["experts"]["gate"]
assert len(w.sharding.device_set) == 8 and w.sharding.shard_shape(w.shape) != w.shape, w.sharding
assert mu.sharding == w.sharding, (mu.sharding, w.sharding)  # Adam moments sharded like their param
print("MESH_OK", err)
'''


@pytest.mark.skipif(not hasattr(sharding, "parallel"), reason="needs the `sharding` package's make_mesh / "
                    "shard_params / parallel (the 'Sharding' issue), not in this build")
def test_fsdp_mesh_step_matches_single_device():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stderr[-4000:]
