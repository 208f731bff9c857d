"""Shared fixtures: tiny HF reference checkpoints, built once per session into a temp directory."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import hf_reference  # noqa: E402


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
