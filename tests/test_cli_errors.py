"""Every command line turns bad input and failed writes into one line on stderr (no traceback, exit 1, or 2
for usage), and checks what it can before reading weights. Full and read-only disks are real: small tmpfs disks
and a read-only tmpfs mounted for the test (skipped where the machine does not allow mounts)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

import dsjax
from checkpoints import synthetic
from train_util import make_tokenizer, write_text_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def _one_line(proc, code=1):
    err = proc.stderr.replace("\r", "\n").strip().splitlines()
    assert proc.returncode == code and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    msgs = [ln for ln in err if ": error: " in ln]
    assert len(msgs) == 1, proc.stderr[-3000:]
    return msgs[0]


@contextlib.contextmanager
def _tmpfs(path, *options, size="4m"):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'}): needs root in a "
                    "container that allows mounts")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = str(d / "tokenizer.json")
    make_tokenizer(tok)
    hf = d / "hf"
    synthetic.write(hf, dsjax.Config.preset("tiny"), seed=0)
    return {"dir": d, "tokenizer": tok, "data": write_text_corpus(str(d / "corpus.txt"), 40, seed=1), "hf": hf}


def _finetune(files, workdir, *extra):
    return ["experiments/finetune.py", f"--workdir={workdir}", "--steps=3", "--config=tiny", "--index_topk=8",
            "--dtype=float32", f"--data={files['data']}", f"--tokenizer={files['tokenizer']}", "--seq_len=32",
            "--batch_size=2", "--warmup_steps=1", "--save_every=1", "--packing=concat", "--progress=false", *extra]


@pytest.mark.parametrize("args,needle", [
    (["--config=tiny", "--prompt_ids=1,2", "--temperature=-1"], "--temperature=-1.0: must be >= 0"),
    (["--config=tiny", "--prompt_ids=1,2", "--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
    (["--config=tiny", "--prompt_ids=1,x"], "'x' is not a token id"),
    (["--config=tiny", "--prompt_ids=1", "--max_new_tokens=0"], "must be >= 1"),
    (["--prompt_ids=1"], "pass exactly one of --ckpt_dir, --hf_dir, --config"),
    (["--config=tiny", "--prompt_ids=1", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--config=nope", "--prompt_ids=1"], "--config"),
])
def test_generate_flag_errors_are_one_line(args, needle):
    line = _one_line(_cli(["experiments/generate.py", *args]), code=2)
    assert line.startswith("generate.py: error:") and needle in line, line


def test_generate_checks_prompts_before_reading_weights(files, tmp_path):
    """An out-of-vocabulary prompt is refused from the config alone: the weights here are unreadable (their
    data deleted), and the error is still about the prompt."""
    ck = tmp_path / "ck"
    assert _cli(["-m", "checkpoints.convert", f"--hf_dir={files['hf']}", f"--out_dir={ck}"]).returncode == 0
    for root, _, fs in os.walk(ck):
        for f in fs:
            if os.sep + "d" + os.sep in os.path.join(root, f):
                os.unlink(os.path.join(root, f))
    line = _one_line(_cli(["experiments/generate.py", f"--ckpt_dir={ck}", "--prompt_ids=1,99999"]))
    assert "token id 99999, outside the vocabulary" in line, line
    line = _one_line(_cli(["experiments/generate.py", f"--ckpt_dir={ck}", "--prompt_ids=1,2"]))
    assert "is damaged: its file" in line and "is missing" in line, line
    line = _one_line(_cli(["experiments/generate.py", f"--ckpt_dir={tmp_path / 'nothing'}", "--prompt_ids=1"]))
    assert "does not exist" in line, line


def test_quickstart_short_runs_and_bad_steps(tmp_path):
    line = _one_line(_cli(["experiments/quickstart.py", "--steps=0", f"--workdir={tmp_path / 'q'}"]), code=2)
    assert "--steps=0" in line, line


def test_full_disk_stops_training_with_one_line(files, tmp_path):
    """A workdir on a 4 MiB disk: the first checkpoint (about 21 MB of params + Adam moments) does not fit.
    The free-space check refuses it up front, before compiling; with the check off (DSJAX_MIN_FREE_MB=-1) Orbax's async write
    really fails, and the run stops at the next step with one line instead of training on unsaved."""
    with _tmpfs(tmp_path / "small"):
        proc = _cli(_finetune(files, tmp_path / "small" / "run"))
        line = _one_line(proc)
        assert "disk full" in line and "saving a checkpoint needs" in line, line  # checked before compiling
        with _tmpfs(tmp_path / "small2"):
            proc = _cli(_finetune(files, tmp_path / "small2" / "run", "--steps=6"), env={"DSJAX_MIN_FREE_MB": "-1"})
            line = _one_line(proc)
            assert "disk full" in line and "saving a checkpoint failed" in line, line
            assert len(proc.stderr.splitlines()) < 30, proc.stderr
            rows = [json.loads(r) for r in open(tmp_path / "small2" / "run" / "metrics.jsonl")]
            assert rows[-1]["step"] <= 2, rows  # step 1's save failed: at most one more step ran


def test_read_only_output_folders(files, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro"):
        line = _one_line(_cli(_finetune(files, tmp_path / "ro" / "run")))
        assert "cannot write" in line and "Read-only file system" in line, line
        line = _one_line(_cli(["-m", "checkpoints.convert", f"--hf_dir={files['hf']}",
                               f"--out_dir={tmp_path / 'ro' / 'ck'}"]))
        assert "cannot write" in line, line


def test_convert_refuses_a_disk_too_small(files, tmp_path):
    """The tiny model converts to ~2.8 MB; the disk has 1 MiB."""
    with _tmpfs(tmp_path / "small", size="1m"):
        line = _one_line(_cli(["-m", "checkpoints.convert", f"--hf_dir={files['hf']}",
                               f"--out_dir={tmp_path / 'small' / 'ck'}"]))
        assert "disk full" in line and "nothing was written" in line, line
