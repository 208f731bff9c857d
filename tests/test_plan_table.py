"""The README's memory-plan table is plan.py's output, not typed: one row (the FP8 decode on 8 devices, the
row that had gone stale) is planned again and must match the README's within 1% per figure (XLA:CPU's
buffer assignment may differ slightly between CPU kinds)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numbers(row):
    return [float(x) for x in re.findall(r"(?<![=\w])\d+\.\d+", row)]


def test_readme_plan_row_is_what_plan_py_prints():
    proc = subprocess.run([sys.executable, "experiments/plan.py", "--mesh=expert=8", "--mode=decode", "--weights=fp8",
                           "--seq_len=32768", "--batch=32", "--hbm_gb=141", "--row"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| decode, 32 x 32K | fp8 | expert=8 "))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = next(line for line in f if line.startswith("| decode, 32 x 32K | fp8 | expert=8 (8) |"))
    got, want = _numbers(row), _numbers(readme)
    assert len(got) == len(want) == 4, (row, readme)
    for g, w in zip(got, want):
        assert abs(g - w) <= 0.01 * w, (row, readme)
