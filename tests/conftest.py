"""Shared fixtures: tiny HF reference checkpoints, built once per session into a temp directory."""

from __future__ import annotations

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# XLA:CPU compiles dominate the suite: LLVM without its expensive passes compiles in about half the time
# (measured: 220 s -> 171 s over the subprocess-heavy files) and computes the same fp32 arithmetic. Set
# before jax is imported; subprocesses inherit it (those that set XLA_FLAGS themselves keep theirs).
# Benchmarks (experiments/) run at the default level.
_FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE

import hf_reference  # noqa: E402
import jax  # noqa: E402

# The longest files first: pytest-xdist (--dist loadfile) hands out files in collection order, so a long file
# collected last runs alone at the end while the other worker idles (measured: 285 s of TPU compiles last).
_LONGEST_FIRST = ("test_tpu_compile.py", "test_sharding_layouts.py", "test_user_path.py", "test_cli_errors.py",
                  "test_train_resume.py", "test_multihost.py", "test_train_mesh.py", "test_train.py",
                  "test_readme.py", "test_checkpoint_integrity.py", "test_gpu_compile.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable otherwise


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every cached executable after each test file. XLA:CPU maps about 3 memory regions per compiled
    executable and jax keeps them all: one file here leaves 11-22K mappings (measured, test_dsa_reference,
    test_train), so an xdist worker that runs half the suite passes the kernel's vm.max_map_count (65530)
    and the next compile dies in mmap (SIGSEGV or SIGABRT, taking the worker with it)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def hf_v32(tmp_path_factory):
    """(torch model, saved directory) of a tiny random DeepSeek V3.2."""
    model = hf_reference.build_hf_model("v32", seed=0)
    return model, hf_reference.save(model, str(tmp_path_factory.mktemp("hf_v32")))


@pytest.fixture(scope="session")
def hf_v3(tmp_path_factory):
    """(torch model, saved directory) of a tiny random DeepSeek V3 (no indexer)."""
    model = hf_reference.build_hf_model("v3", seed=1)
    return model, hf_reference.save(model, str(tmp_path_factory.mktemp("hf_v3")))
