"""Streaming conversion of a checkpoint bigger than the memory it may use: peak RSS bounded far below
the model size, and a conversion killed with SIGKILL leaves nothing loadable and resumes on rerun."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
from checkpoints import orbax_io, synthetic
from checkpoints.safetensors_io import CheckpointReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_RSS = 1.5e9


def _run(cmd, kill_after_lines=None, journal=None):
    """Run the CLI; optionally SIGKILL it once `journal` has that many lines. Returns (status, peak RSS, stderr)."""
    with open(os.devnull, "w") as devnull, open(journal.parent.parent / "stderr.txt" if journal else os.devnull,
                                                  "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=devnull, stderr=err, env=dict(os.environ, PYTHONPATH=ROOT))
        if kill_after_lines is not None:
            while p.poll() is None:
                if journal.exists() and len(journal.read_text().splitlines()) >= kill_after_lines:
                    os.kill(p.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS (kB on Linux)
    return status, usage.ru_maxrss * 1024


@pytest.fixture
def big_tmp(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps recent temp dirs, and these hold 4 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_2gb_conversion_bounded_rss_killed_and_resumed(big_tmp):
    tmp_path = big_tmp
    cfg = synthetic.wide_config(num_hidden_layers=6)  # 2.1 GB of BF16 in 2k tensors, 5 MoE layers
    src = tmp_path / "hf"
    size = synthetic.write(src, cfg)
    assert size >= 2e9
    out = tmp_path / "ckpt"
    journal = orbax_io.partial_dir(out) / orbax_io.JOURNAL
    cmd = [sys.executable, "-m", "checkpoints.convert", f"--hf_dir={src}", f"--out_dir={out}", "--nocompress"]
    n_tensors = len(CheckpointReader(src).keys())

    status, rss_killed = _run(cmd, kill_after_lines=n_tensors // 3, journal=journal)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "finished before it was killed"
    committed = len(journal.read_text().splitlines())
    assert not out.exists()
    with pytest.raises(checkpoints.CheckpointError, match="interrupted"):
        checkpoints.load(out)

    status, rss = _run(cmd, journal=journal)
    log = (tmp_path / "stderr.txt").read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log[-3000:]
    assert f"({committed} blocks already committed)" in log, log[-3000:]
    assert max(rss, rss_killed) < MAX_RSS, (rss_killed, rss)
    assert not orbax_io.partial_dir(out).exists()

    # The result is whole: every array present, and sampled tensors (written before and after the kill)
    # hold exactly the source values ([out, in] -> [in, out] for linears).
    assert set(orbax_io.stored_shapes(out)) >= {"moe.moe.experts.gate", "lm_head", "embed"}
    r = CheckpointReader(src)
    last = cfg.n_moe_layers - 1
    for name, leaf, idx, linear in [
            ("model.embed_tokens.weight", "embed", (), False),
            ("model.layers.1.mlp.experts.0.gate_proj.weight", "moe.moe.experts.gate", (0, 0), True),
            ("model.layers.3.mlp.experts.77.down_proj.weight", "moe.moe.experts.down", (2, 77), True),
            (f"model.layers.{last + 1}.mlp.experts.127.up_proj.weight", "moe.moe.experts.up", (last, 127), True),
            (f"model.layers.{last + 1}.self_attn.o_proj.weight", "moe.attn.wo", (last,), True),
            ("lm_head.weight", "lm_head", (), True)]:
        want = r.read(name)
        got = np.asarray(orbax_io.open_array(out, leaf)[idx].read().result())
        want = want.T if linear else want
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=name)
