"""experiments/bench_gpu.py (the one-call GPU device benchmark) runs end to end on CPU in interpret mode at
small shapes, so the script a GPU session runs cannot rot; its accuracy column must show the kernels agree
with the XLA path."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_runs_in_interpret_mode():
    env = dict(os.environ)  # (the suite's fast-compile XLA flags: this checks the script runs, not its times)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "bench_gpu.py"), "--small",
                           "--interpret", "--repeats=1"], capture_output=True, text=True, timeout=900, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for name in ("sparse MLA prefill fwd", "sparse MLA decode", "sparse MLA fwd+bwd", "indexer scores"):
        row = re.search(rf"^{re.escape(name)}\s+(\S+)", out, re.M)
        assert row, (name, out)
        assert float(row.group(1)) < 3e-2, (name, row.group(0))  # bf16 kernels vs the f32-accumulating XLA path
    assert "kernel / XLA: forward" in out
