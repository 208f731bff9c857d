"""The README's Python snippets run as written (on the tiny preset they use), each in a fresh process: the
scaling one with 8 simulated devices, as its first line says."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)


def test_readme_has_its_snippets():
    names = [s.splitlines()[0] for s in _snippets()]
    assert len(names) == 3 and all(n.startswith("import jax, dsjax") for n in names), names


@pytest.mark.parametrize("i", range(3))
def test_readme_snippet_runs(i, tmp_path):
    code = _snippets()[i]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    if "xla_force_host_platform_device_count=8" in code.splitlines()[0]:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")  # paths relative to the repo root
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
