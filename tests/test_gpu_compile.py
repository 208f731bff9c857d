"""The GPU kernels through the real compilers: the Triton modules Pallas emits, compiled to cubins for sm_90
(H100/H200) and sm_100 (B200) by the `triton` wheel, with `ptxas -v` (experiments/gpu_compile.py).

Every kernel the public ops emit (sparse MLA forward, backward, decode; the indexer behind top-k; dense causal
flash MLA forward, dQ and dK/dV) must fit the
232,448 B of shared memory one block may use, at the real V3.2 shapes and at the interpret-mode tests' shapes;
registers and spills are reported. A canary (the backward with the forward's 64-head block, which needs
311,296 B) shows the check can fail. Needs triton installed apart from the environment, as the README's test
command does (`pip install --no-deps --target .triton "triton==3.6.*"`).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "gpu_compile.py")
TRITON = os.environ.get("DSJAX_TRITON_DIR", os.path.join(REPO, ".triton"))
LIMIT = 232_448


def _run(tmp_path, *flags):
    if not os.path.isdir(os.path.join(TRITON, "triton")):
        pytest.fail(f"triton is not installed in {TRITON}: run the README's test command (it installs it with "
                    f"`pip install --no-deps --target .triton \"triton==3.6.*\"`).")
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, SCRIPT, f"--json={out}", *flags], capture_output=True, text=True,
                          timeout=900, env=env, cwd=REPO)
    print(proc.stdout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_gpu_kernel_fits_h100_h200_b200(tmp_path):
    proc, res = _run(tmp_path, "--targets=90,100", "--shapes=real,test")
    bad = {k: r for k, r in res.items() if not r["ok"] or r["shared_bytes"] > LIMIT}
    assert not bad, bad
    assert proc.returncode == 0
    names = " | ".join(res)
    for cc in ("sm_90", "sm_100"):
        for kernel in ("sparse_mla fwd B1 T256 S8K #0 sparse_mla_fwd_gpu", "sparse_mla grad B1 T256 S8K #1 sparse_mla_bwd_gpu",
                       "sparse_mla decode B64 S8K #0 sparse_mla_fwd_gpu", "indexer_topk prefill", "t: fwd", "t: grad",
                       "t: decode", "t: indexer", "dense_mla fwd B1 T4K #0 dense_mla_fwd_gpu",
                       "dense_mla grad B1 T4K #1 dense_mla_dq_gpu", "dense_mla grad B1 T4K #2 dense_mla_dkv_gpu",
                       "t: dense grad t70 h3 #2 dense_mla_dkv_gpu"):
            assert f"{cc} {kernel}" in names, (cc, kernel)
    for name, r in res.items():  # every kernel reports its registers (ptxas -v ran)
        assert r["registers"] > 0, name
        # only the backward scatters (dK/dV atomics); the forward kernels own their outputs
        assert (r["atomics_per_trip"] > 0) == ("sparse_mla_bwd_gpu" in name), (name, r["atomics_per_trip"])


def test_the_check_rejects_the_64_head_backward(tmp_path):
    proc, res = _run(tmp_path, "--targets=90", "--shapes=canary")
    assert proc.returncode == 1
    (r,) = [r for k, r in res.items() if "sparse_mla_bwd_gpu" in k]
    assert not r["ok"] and r["shared_bytes"] > LIMIT
