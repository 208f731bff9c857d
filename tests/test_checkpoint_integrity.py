"""Damaged checkpoints are refused by name: per-array checksums (converted checkpoints, training state),
file manifests (missing / truncated files), storage errors as one CheckpointError, and the CLIs print one
line for each. The damage is real: bytes flipped in the files on disk, files truncated or deleted, an
optimizer moment rewritten behind the checkpointer's back."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoints
import dsjax
from checkpoints import convert, integrity, synthetic
from train_util import make_tokenizer, write_text_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _data_files(d):
    """Orbax array data files under d (OCDBT `d/` files), largest first."""
    out = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
    return sorted(out, key=os.path.getsize, reverse=True)


def _flip(path, n=4096):
    """XOR n bytes in the middle of the file (size unchanged)."""
    size = os.path.getsize(path)
    start = max(0, size // 2 - n // 2)
    with open(path, "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(min(n, size - start)))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _one_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    synthetic.write(d, dsjax.Config.preset("tiny"), seed=1)
    return d


def test_checksum_does_not_depend_on_how_the_array_is_split():
    """Host, device and block-by-block checksums agree for every stored dtype; one flipped bit changes it."""
    rng = np.random.default_rng(0)
    for dt in (np.float32, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.int32, np.uint32):
        a = (rng.standard_normal((3, 6, 5)) * 8).astype(dt)
        whole = integrity.host_checksum(a)
        on_device = integrity.device_checksums({"a": jnp.asarray(a)})["a"]
        blocks = [integrity.block_checksum(a[i, r0:r1], (i, slice(r0, r1)), a.shape)
                  for i in range(3) for r0, r1 in ((0, 4), (4, 6))]
        assert whole == on_device == integrity.combine(blocks), dt
        b = a.copy()
        b.reshape(-1).view(np.uint8)[7] ^= 1
        assert integrity.host_checksum(b) != whole
        assert integrity.host_checksum(a.reshape(6, 3, 5)) == whole  # row-major order, not the shape
        swapped = a.copy()
        swapped[0, 0], swapped[0, 1] = a[0, 1].copy(), a[0, 0].copy()
        if not np.array_equal(a[0, 0].view(np.uint8), a[0, 1].view(np.uint8)):
            assert integrity.host_checksum(swapped) != whole
    # structured damage: a doubled float tensor adds 2^23 to every word (invisible to a plain sum mod 2^32
    # when the element count is a power of two)
    big = rng.standard_normal((512, 128)).astype(np.float32)
    assert integrity.host_checksum(big * 2) != integrity.host_checksum(big)


def test_flipped_bytes_are_refused_naming_the_array(hf_tiny, tmp_path):
    """4 KB flipped inside an uncompressed converted checkpoint: the data still decodes, so only the
    checksums can tell. load, export and generate.py refuse it, naming the array; nothing is exported."""
    ck = tmp_path / "ck"
    convert.convert(hf_tiny, ck, compress=False, progress=False)
    _flip(_data_files(ck)[0])
    with pytest.raises(checkpoints.CheckpointError, match=r"array \S+ .*does not match the checksum"):
        checkpoints.load(ck)
    line = _one_line(_cli("-m", "checkpoints.export", f"--ckpt_dir={ck}", f"--out_dir={tmp_path / 'hf'}"))
    assert line.startswith("checkpoints.export: error:") and "does not match the checksum" in line, line
    assert not (tmp_path / "hf").exists()
    line = _one_line(_cli("experiments/generate.py", f"--ckpt_dir={ck}", "--prompt_ids=1,2", "--max_new_tokens=2"))
    assert "does not match the checksum" in line, line


def test_damaged_compressed_checkpoint_missing_and_truncated_files(tmp_path):
    """checkpoints.save writes zstd chunks: flipped bytes there are a storage error, still one CheckpointError;
    a truncated or deleted data file is named by the manifest before anything is read."""
    cfg = dsjax.Config.preset("tiny")
    params = dsjax.init_params(cfg, jax.random.key(0))
    for case in ("flip", "truncate", "delete"):
        ck = tmp_path / case
        checkpoints.save(ck, params, cfg)
        victim = _data_files(ck)[0]
        if case == "flip":
            _flip(victim)
            match = r"is damaged: (its data cannot be read|array \S+ .*does not match the checksum)"
        elif case == "truncate":
            os.truncate(victim, os.path.getsize(victim) // 2)
            match = f"its file {victim} is truncated"
        else:
            os.unlink(victim)
            match = f"its file {victim} is missing"
        with pytest.raises(checkpoints.CheckpointError, match=match) as e:
            checkpoints.load(ck)
        assert len(str(e.value).splitlines()) == 1
    _, ok = checkpoints.load(_save_again(tmp_path / "fresh", params, cfg))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), ok, params))


def _save_again(path, params, cfg):
    checkpoints.save(path, params, cfg)
    return path


def test_corrupt_training_state_is_refused_and_the_intact_step_named(tmp_path):
    """A run with checkpoints at steps 1 and 2; step 2's Adam moment is rewritten on disk (readable, wrong):
    --resume refuses it, naming the array and step 1 as intact; load/export of the run refuse step 2, and
    step 1 still loads."""
    from dsjax.train import DataConfig, OptimConfig, RunConfig, TrainConfig, run

    tok = str(tmp_path / "tok.json")
    make_tokenizer(tok)
    data = write_text_corpus(str(tmp_path / "corpus.txt"), 40, seed=3)
    rc = RunConfig(model=dsjax.Config.preset("tiny", index_topk=8, dtype="float32"), tokenizer=tok, steps=2,
                   workdir=str(tmp_path / "run"), save_every=1, keep=3, progress=False,
                   data=DataConfig(paths=(data,), seq_len=32, batch_size=2, packing="concat"),
                   train=TrainConfig(stage="sft", remat=None, optim=OptimConfig(learning_rate=1e-3, warmup_steps=1,
                                                                                total_steps=10)))
    run(rc)
    state_dir = tmp_path / "run" / "checkpoints" / "2" / "state"
    with ocp.StandardCheckpointer() as ck:
        state = ck.restore(state_dir)
        mu = state["opt_state"][1][0]["mu"]["params"]  # restored without a template: lists and dicts
        mu["embed"] = np.asarray(mu["embed"]) + 1e-3
        ck.save(str(state_dir) + ".new", state)
    os.rename(state_dir, str(state_dir) + ".old")
    os.rename(str(state_dir) + ".new", state_dir)

    with pytest.raises(checkpoints.CheckpointError,
                       match=r"checkpoints/2 is damaged: array opt_state/1/0/mu/params/embed .*Step 1 is intact"):
        run(dataclasses.replace(rc, steps=3, resume=True))
    # the weights of step 2 are intact (only the moment changed), so the model itself still loads ...
    checkpoints.load(tmp_path / "run")
    # ... but damaged weights do not
    with ocp.StandardCheckpointer() as ck:
        state = ck.restore(state_dir)
        state["params"]["embed"] = np.asarray(state["params"]["embed"]) * 2
        ck.save(str(state_dir) + ".w", state)
    os.rename(state_dir, str(state_dir) + ".old2")
    os.rename(str(state_dir) + ".w", state_dir)
    with pytest.raises(checkpoints.CheckpointError, match=r"2/state is damaged: array params/embed"):
        checkpoints.load(tmp_path / "run")
    checkpoints.load(tmp_path / "run", step=1)
