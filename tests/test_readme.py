"""The README's Python snippets run as written (on the tiny preset they use): all in one process with the 8
simulated devices the scaling one asks for, each in a fresh namespace; and the flagfiles the docs name exist."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)


def test_readme_has_its_snippets():
    names = [s.splitlines()[0] for s in _snippets()]
    assert len(names) == 4 and all(n.startswith("import jax, dsjax") for n in names), names


RUNNER = r"""
import sys, traceback
for i, code in enumerate(sys.argv[1:]):
    try:
        exec(compile(code, f"README snippet {i + 1}", "exec"), {"__name__": "__main__"})  # a fresh namespace each
    except Exception:
        traceback.print_exc()
        sys.exit(f"README snippet {i + 1} failed")
    print(f"SNIPPET_OK {i + 1}", flush=True)
"""


def test_readme_snippets_run(tmp_path):
    """All three in one process (one jax start-up), each in its own namespace, with the 8 simulated devices
    the scaling snippet's first line asks for (the other two run on device 0 as usual)."""
    codes = _snippets()
    assert "xla_force_host_platform_device_count=8" in codes[2].splitlines()[0]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")  # paths relative to the repo root
    proc = subprocess.run([sys.executable, "-c", RUNNER, *codes], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "SNIPPET_OK 4" in proc.stdout, proc.stderr[-4000:]


def test_every_flagfile_named_in_docs_exists():
    """Flagfiles the README and the scripts' docstrings tell users to pass are shipped."""
    named = set()
    for d, _, files in os.walk(ROOT):
        rel = os.path.relpath(d, ROOT)
        if rel != "." and any(part.startswith(".") for part in rel.split(os.sep)):
            continue
        for f in files:
            if f.endswith((".py", ".md")):
                with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
                    named |= set(re.findall(r"experiments/configs/[\w.\-]+\.flags", fh.read()))
    assert len(named) >= 3, named
    missing = sorted(n for n in named if not os.path.isfile(os.path.join(ROOT, n)))
    assert not missing, missing
