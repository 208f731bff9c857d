"""The dependency graph: dsjax never imports sharding (sharding -> dsjax, one way), no first-party import
hides inside a function to break a cycle, the module-level import graph has no cycle, no contextvars hook
remains, and modules import alone in a fresh interpreter."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsjax", "sharding", "checkpoints", "pallas_kernels")


def _modules() -> dict[str, str]:
    """First-party module name -> file path."""
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


MODULES = _modules()


def _imports(path: str):
    """(module-level imported names, function-level imported names), TYPE_CHECKING blocks skipped."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top, inner = [], []

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:  # relative imports are not used in this project
            raise AssertionError(f"{path}: relative import")
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names]

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_func else top).extend(names(child))
            visit(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def _first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_dsjax_never_imports_sharding():
    bad = [(m, n) for m, p in MODULES.items() if m.split(".")[0] == "dsjax"
           for n in sum(_imports(p), []) if n.split(".")[0] == "sharding"]
    assert not bad, bad


def test_no_function_level_first_party_imports():
    bad = [(m, n) for m, p in MODULES.items() for n in _imports(p)[1] if _first_party(n)]
    assert not bad, bad


def test_no_contextvars_hooks_remain():
    bad = [m for m, p in MODULES.items() if "contextvars" in sum(_imports(p), [])]
    assert not bad, bad


def test_module_level_import_graph_is_acyclic():
    graph = {m: sorted({n for n in _imports(p)[0] if n in MODULES and n != m}) for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def dfs(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                dfs(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m, [m])
    assert graph["sharding.forward"] and "dsjax.model" in graph["sharding.forward"]  # the graph is real


# The modules a cycle would surface in first (each imports others of its package at module level).
ALONE = ("dsjax.latents", "dsjax.cache", "dsjax.attention", "dsjax.mtp", "dsjax.parallel", "dsjax.train.trainer",
         "sharding.forward", "sharding.context_parallel", "checkpoints.restore")


def test_modules_import_alone_in_a_fresh_interpreter():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    code = "import sys, {m}; print('sharding' in sys.modules)"
    procs = {m: subprocess.Popen([sys.executable, "-c", code.format(m=m)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in ALONE}
    for m, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (m, err[-2000:])
        if m.startswith("dsjax"):  # not even transitively (e.g. through checkpoints)
            assert out.strip() == "False", m


@pytest.mark.parametrize("name", ["attend", "route_and_dispatch", "forward", "sharding", "param_shardings", "check"])
def test_the_interface_is_implemented_by_sharding(name):
    import sharding
    from dsjax.parallel import Parallelism

    assert name in Parallelism.__abstractmethods__
    assert name in vars(sharding.MeshParallelism)
