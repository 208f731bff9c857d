"""Training on a device mesh (8 simulated CPU devices, in a subprocess so the rest of the suite keeps one
device): the sharded step gives the single-device update, and optimizer moments live where their params do."""

import os
import subprocess
import sys

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

d = sys.argv[1]
treedef = jax.tree.structure(dsjax.abstract_params(CFG))
load = lambda name: jax.tree.unflatten(treedef, [jnp.asarray(x) for x in np.load(f"{d}/{name}.npz").values()])
params, ref = load("params"), load("ref")
tc = dataclasses.replace(TC, grad_accum=1)
mesh = sharding.make_mesh(fsdp=8, config=CFG)
st = trainer.place_state(S.init_state(params, CFG, tc, jax.random.key(1)), CFG, mesh)
fn = S.compiled_step(CFG, tc, mesh)
batch = trainer.place_batch(make_batch(seed=3, b=8), mesh)
for _ in range(2):  # the first step has lr = 0 (warm-up): the second one moves the params
    st, m = fn(st, batch)
err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(st["params"]), jax.tree.leaves(ref)))
assert err < 1e-5, err
w = st["params"]["moe"]["moe"]["experts"]["gate"]
mu = st["opt_state"][1][0].mu["params"]["moe"]["moe"]["experts"]["gate"]
assert len(w.sharding.device_set) == 8 and w.sharding.shard_shape(w.shape) != w.shape, w.sharding
assert mu.sharding == w.sharding, (mu.sharding, w.sharding)  # Adam moments sharded like their param
print("MESH_OK", err, float(m["loss"]))
'''


def test_fsdp_mesh_step_matches_single_device(tmp_path):
    """Two steps on an 8-device fsdp mesh (subprocess) equal two single-device steps (this process: the
    step with grad_accum=1 is the one test_train compiles too)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsjax
    from dsjax.train import step as step_lib
    from test_train import CFG, TC, make_batch

    params = dsjax.init_params(CFG, jax.random.key(0))
    np.savez(tmp_path / "params.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
    tc = dataclasses.replace(TC, grad_accum=1)
    st = step_lib.init_state(jax.tree.map(jnp.copy, params), CFG, tc, jax.random.key(1))
    for _ in range(2):
        st, m = step_lib.compiled_step(CFG, tc)(st, make_batch(seed=3, b=8))
    np.savez(tmp_path / "ref.npz", *[np.asarray(x) for x in jax.tree.leaves(st["params"])])
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stderr[-4000:]
    assert abs(float(proc.stdout.split()[-1]) - float(m["loss"])) <= 1e-5 * float(m["loss"])
