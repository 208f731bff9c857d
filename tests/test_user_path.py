"""The new user's path, as the README gives it: the quickstart trains a model (a few steps here), and the
commands it prints at the end work as printed: generate.py samples from the run, checkpoints.export writes
an HF directory, and HF transformers loads that directory and computes the same logits as dsjax on the run's
weights. Plus: every kind of model directory resolves, and bad ones give one clear CheckpointError."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _run(cmd: list[str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("qs") / "run"
    out = _run([sys.executable, "experiments/quickstart.py", "--steps=3", f"--workdir={work}", "--new_tokens=8"])
    lines = out.strip().splitlines()
    i = lines.index("use the model:")
    # three stages (dense, indexer warm-up, sparse) of one step each; the model is the last stage's run
    assert all(os.path.isdir(work / d / "checkpoints") for d in ("1_dense", "2_indexer_warmup", "3_sparse"))
    assert "top-64 recall" in out
    return {"work": str(work / "3_sparse"), "out": out, "generate": shlex.split(lines[i + 1]),
            "export": shlex.split(lines[i + 2])}


@pytest.mark.slow
def test_quickstart_commands_work_as_printed(quickstart):
    gen, exp = quickstart["generate"], quickstart["export"]
    assert gen[:2] == ["python", "experiments/generate.py"] and exp[:3] == ["python", "-m", "checkpoints.export"]
    out = _run([sys.executable] + gen[1:] + ["--max_new_tokens=4"])
    assert "[dsjax] 1 prompt(s)" in out and "4 new tokens" in out
    _run([sys.executable] + exp[1:])
    hf_dir = next(a.split("=", 1)[1] for a in exp if a.startswith("--out_dir="))
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))  # the run's tokenizer travels with it

    import torch
    from transformers import AutoModelForCausalLM

    import dsjax

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    config, params = checkpoints.load(quickstart["work"])  # the run's workdir resolves to its latest step
    tokens = np.random.default_rng(0).integers(2, config.vocab_size, (1, 48))  # <= index_topk: no pruning
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(dsjax.forward(params, tokens, config))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.slow
def test_every_kind_of_model_directory_resolves(quickstart, tmp_path):
    ck = os.path.join(quickstart["work"], "checkpoints")
    md = checkpoints.describe(ck)
    assert md.kind == "training" and md.step == 1 and md.tokenizer.endswith("kjv_bpe.json")
    assert checkpoints.describe(quickstart["work"]) == md  # the workdir
    assert checkpoints.describe(os.path.join(ck, "1")) == md  # one step
    with pytest.raises(checkpoints.CheckpointError, match=r"without step 9; it has steps \[1\]"):
        checkpoints.describe(ck, step=9)
    steps = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
    assert checkpoints.describe(ck, step=steps[0]).step == steps[0]  # a named earlier step
    saved = tmp_path / "saved"
    cfg, params = checkpoints.load(ck)
    checkpoints.save(saved, params, cfg)
    assert checkpoints.describe(saved).kind == "converted"
    _, again = checkpoints.load(saved)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(again)))


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is not a dsjax model"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "half.partial").mkdir() or p / "half", "write was interrupted"),
])
def test_bad_model_directories_give_one_clear_error(tmp_path, make, needle):
    with pytest.raises(checkpoints.CheckpointError, match=needle):
        checkpoints.load(make(tmp_path))


def test_plan_refuses_lengths_beyond_the_model():
    proc = subprocess.run([sys.executable, "experiments/plan.py", "--config=tiny", "--mesh=fsdp=1", "--seq_len=4096"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "exceeds tiny's max_position_embeddings=2048" in proc.stderr, proc.stderr[-2000:]
