"""One process of the 2-process test (tests/test_multihost.py): real `jax.distributed` on localhost.

Each process owns 2 CPU devices; the 4 global devices form a sequence=2 x expert=2 mesh whose expert
axis spans the two processes (the expert all-to-all and the gradient all-reduces cross the process
boundary over gloo). The process runs a sharded forward and a train-style step (cross-entropy, gradients,
one SGD-with-momentum update) and the same step on its own single local device, and writes both to a JSON file.

    python tests/multihost_worker.py PROCESS_ID PORT OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dsjax  # noqa: E402
import sharding  # noqa: E402
from dsjax import model  # noqa: E402

CFG = dsjax.Config.preset("tiny")
B, T = 4, 128  # T > index_topk: DSA prunes


def train_step(forward, opt):
    """Cross-entropy on next tokens, its gradients and one optimizer update."""
    def loss_fn(p, tokens):
        logits = forward(p, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    def step(p, state, tokens):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, tokens)
        updates, state = opt.update(grads, state, p)
        return loss, logits, grads, optax.apply_updates(p, updates)

    return step


def main(pid: int, port: int, out_path: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    t0 = time.time()
    assert jax.device_count() == 4 and jax.local_device_count() == 2, (jax.device_count(), jax.local_device_count())
    params = dsjax.init_params(CFG, jax.random.key(0))  # same values in both processes (same key)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size))
    opt = optax.sgd(0.1, momentum=0.9)  # linear in the gradients: a step compares like the gradients do

    # one process's view: the whole step on its first local device. Both runs replay its discrete choices
    # (DSA keys, MoE routing): the sharded run's other summation order can flip a near tie
    # (tests/test_train_mesh.py), which moves logits by ~1%.
    sel = jax.jit(lambda p, t: model.forward_with_aux(p, t, CFG, record_selection=True)[1].selection)(
        params, jnp.asarray(tokens))
    sel = jax.tree.map(np.asarray, sel)
    ref = jax.jit(train_step(lambda p, t: model.forward_with_aux(p, t, CFG, selection=sel)[0], opt))(
        params, opt.init(params), jnp.asarray(tokens))
    ref = jax.tree.map(np.asarray, ref)

    # global: devices ordered so that the expert axis pairs one device of each process
    by_proc = [[d for d in jax.devices() if d.process_index == i] for i in range(2)]
    devices = [by_proc[0][0], by_proc[1][0], by_proc[0][1], by_proc[1][1]]
    mesh = sharding.make_mesh(sequence=2, expert=2, devices=devices, config=CFG)
    ps = sharding.shard_params(params, CFG, mesh)
    state = jax.jit(opt.init, out_shardings=sharding.opt_state_shardings(
        jax.eval_shape(opt.init, params), CFG, mesh))(ps)
    tk = sharding.put(tokens, sharding.logical_to_sharding(sharding.TOKEN_AXES, mesh, tokens.shape))
    rep = sharding.logical_to_sharding((), mesh)
    step = jax.jit(train_step(lambda p, t: sharding.forward_with_aux(p, t, CFG, mesh, selection=sel)[0], opt),
                   out_shardings=rep)  # replicated results: every process can read them whole
    got = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), step(ps, state, tk))
    shard = sharding.sharded_forward(ps, tokens, CFG, mesh, selection=sel).addressable_shards[0]  # public entry

    rel = lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
    res = {
        "process": pid, "devices": jax.device_count(), "processes": jax.process_count(),
        "loss": float(got[0]), "ref_loss": float(ref[0]),
        "logits_err": float(np.max(np.abs(got[1] - ref[1]))),
        "forward_err": float(np.max(np.abs(np.asarray(shard.data) - ref[1][shard.index]))),
        "grad_rel_err": max(rel(a, b) for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2]))),
        "param_rel_err": max(rel(a, b) for a, b in zip(jax.tree.leaves(got[3]), jax.tree.leaves(ref[3]))),
        "seconds": time.time() - t0,
    }
    with open(out_path, "w") as f:
        json.dump(res, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
