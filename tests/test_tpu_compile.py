"""The TPU kernels through the real compilers: libtpu's Mosaic and XLA:TPU on compile-only topologies.

`experiments/tpu_compile.py` compiles every TPU kernel path (sparse MLA forward, gradient and decode over the
stacked packed cache; indexer scores and top-k, prefill and decode; dense causal flash MLA forward and gradient) for v5e, v5p and v6e in bf16, at the real
V3.2 shapes and at the exact shapes and block sizes of the interpret-mode numerics tests. It fails on a compile
error, on a relayout copy of a cache-shaped buffer in the post-layout HLO, on a kernel output padded more than
2x by its layout, and on decode temp memory above 10% of one layer's cache. It also compiles the sharded
model forward for an 8-chip v5p slice and requires the TPU paths (ragged all-to-all, the kernels), and the
whole model's decode step over the packed cache, where no layer of the cache may be sliced or copied. Canaries that commit each
fault show the check can fail. It needs libtpu installed apart from the main environment, as the README's
test command does (`pip install --no-deps --target .libtpu "libtpu==0.0.42.*"`); about 30 s per generation.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "tpu_compile.py")
LIBTPU = os.environ.get("DSJAX_LIBTPU_DIR", os.path.join(REPO, ".libtpu"))


def _run(tmp_path, *flags, timeout=900):
    if not os.path.isdir(os.path.join(LIBTPU, "libtpu")):
        pytest.fail(f"libtpu is not installed in {LIBTPU}: run the README's test command (it installs it with "
                    f"`pip install --no-deps --target .libtpu \"libtpu==0.0.42.*\"`).")
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, SCRIPT, f"--json={out}", *flags], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    print(proc.stdout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_tpu_kernel_compiles_for_v5e_v5p_v6e(tmp_path):
    proc, res = _run(tmp_path, "--generations=v5e,v5p,v6e", "--shapes=real,test,sharded,model")
    failed = {f"{g} {n}": r.get("problems") or r.get("error") for g, rs in res.items() for n, r in rs.items()
              if not r["ok"]}
    assert not failed, failed
    assert proc.returncode == 0
    for gen, rs in res.items():
        names = " | ".join(rs)
        for kernel in ("sparse_mla fwd", "sparse_mla grad", "sparse_mla decode", "indexer_topk prefill",
                       "indexer_topk decode", "indexer_scores", "t: fwd", "t: grad", "t: bwd", "t: decode",
                       "t: race", "t: model", "t: indexer", "dense_mla fwd", "dense_mla grad",
                       "t: dense blocks", "t: dense op"):
            assert kernel in names, (gen, kernel)
        # the layer scan's decode reads the stacked cache in place: no temp near one layer's cache
        dec = rs["sparse_mla decode B64 S8K L4"]
        assert dec["temp_bytes"] < dec["cache_bytes"] // 100, dec
        # the whole model's decode step over the packed cache: the kernels read each layer in place
        step = rs["model decode step B8 S2048 packed"]
        assert step["counts"] == {"layer-cache copies": 0, "layer slices": 0}, step
        assert step["temp_bytes"] < step["cache_bytes"] // 10, step  # (0 on v5e / v6e, 1.7 MB on v5p)
        if gen == "v5p":  # backends follow the lowering platform: the TPU collectives and kernels, from CPU
            for layout in ("expert=4,fsdp=2", "sequence=2,expert=4"):
                counts = rs[f"sharded forward v5p:2x2x2 {layout}"]["counts"]
                assert all(counts.values()), counts
        # the compiled cost is the kernel's: 2·H·K·(Dc + Dr + Dc) FLOPs per token (FlashMLA's count)
        # dense causal (flash) kernels: the forward keeps O(T) temp (no [T, S] buffer), its cost is the
        # causal half of the pairs, 2·H·(S/2)·(Dc + Dr + Dc) FLOPs per token
        dense = rs["dense_mla fwd   B1 T4K"]
        assert dense["temp_bytes"] < 16 * 2**20, dense
        assert abs(dense["flops"] / dense["tokens"] - 2 * 128 * 2048 * (512 + 64 + 512)) < 0.02 * 5.7e8, dense
        fwd = rs["sparse_mla fwd   B1 T256 S8K"]
        assert abs(fwd["flops"] / fwd["tokens"] - 2 * 128 * 2048 * (512 + 64 + 512)) < 0.02 * 5.7e8, fwd


def test_the_check_rejects_known_bad_kernels(tmp_path):
    """A one-row DMA into bf16 VMEM (the old kernels' layout) fails Mosaic; a [S, 288] cache is relaid out."""
    proc, res = _run(tmp_path, "--generations=v5e", "--shapes=canary", timeout=300)
    assert proc.returncode == 1
    r = res["v5e"]
    assert not r["canary: bf16 one-row DMA"]["ok"] and "aligned to tiles" in r["canary: bf16 one-row DMA"]["error"]
    relayout = r["canary: 288-wide cache relayout"]
    assert not relayout["ok"] and any("relayout copy: copy u32[4096, 288]" in p for p in relayout["problems"])
