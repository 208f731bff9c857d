"""Checkpoint / resume: stop-and-resume gives bit-identical losses (in-process, and after SIGTERM to a real
`experiments/finetune.py` process), kill -9 during an async save leaves the previous checkpoint loadable,
TensorBoard / PNG outputs, and clear errors from the script."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from script_util import load_script
from train_util import make_tokenizer, write_text_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "finetune.py")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tok = str(d / "tokenizer.json")
    make_tokenizer(tok)
    return {"dir": d, "tokenizer": tok, "data": write_text_corpus(str(d / "corpus.txt"), 80, seed=2)}


def flags_for(files, workdir, steps, *extra):
    return [f"--workdir={workdir}", f"--steps={steps}", "--schedule_steps=1000", "--config=tiny", "--index_topk=8",
            "--dtype=float32", f"--data={files['data']}", f"--tokenizer={files['tokenizer']}", "--seq_len=32",
            "--batch_size=4", "--grad_accum=2", "--lr=3e-3", "--warmup_steps=2", "--save_every=2", "--keep=2",
            "--packing=concat", "--progress=false", *extra]


@pytest.fixture(scope="module")
def finetune():
    with load_script(SCRIPT, "finetune_script") as mod:
        yield mod


def run_in_process(finetune, argv):
    """Parse the script's flags in this process and run the same trainer the script runs."""
    from dsjax.train import trainer

    finetune.FLAGS.unparse_flags()
    finetune.FLAGS(["finetune.py"] + argv)
    return trainer.run(finetune.build_run_config())


def losses(rows):
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def preempted(files):
    """A real finetune.py process, sent SIGTERM as soon as it has logged step 3 (a watcher thread, so the
    in-process tests can run meanwhile). Returns (workdir, returncode, stdout, stderr)."""
    workdir = files["dir"] / "preempted"
    proc = subprocess.Popen([sys.executable, SCRIPT, *flags_for(files, workdir, 1000, "--save_every=1000")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"

    def watch():
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
                proc.send_signal(signal.SIGTERM)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    def finish():
        watcher.join()
        out, err = proc.communicate(timeout=600)
        return workdir, out, err, proc.returncode

    yield finish
    if proc.poll() is None:
        proc.kill()


def test_stop_and_resume_is_bit_identical(files, finetune, preempted):
    full = run_in_process(finetune, flags_for(files, files["dir"] / "full", 6))
    run_in_process(finetune, flags_for(files, files["dir"] / "split", 3))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_in_process(finetune, flags_for(files, files["dir"] / "split", 6))
    with pytest.raises(ValueError, match="different settings.*learning_rate"):
        run_in_process(finetune, flags_for(files, files["dir"] / "split", 6, "--resume", "--lr=1e-3"))
    other = write_text_corpus(str(files["dir"] / "other.txt"), 80, seed=3)  # another data file: refused
    with pytest.raises(ValueError, match=r"different settings \(data: .*other\.txt"):
        run_in_process(finetune, [a for a in flags_for(files, files["dir"] / "split", 6, "--resume")
                                  if not a.startswith("--data=")] + [f"--data={other}"])
    with pytest.raises(ValueError, match="holds no checkpoint to resume"):  # e.g. a mistyped --workdir
        run_in_process(finetune, flags_for(files, files["dir"] / "splt", 6, "--resume"))
    resumed = run_in_process(finetune, flags_for(files, files["dir"] / "split", 6, "--resume"))
    assert resumed.step == 6 and full.step == 6
    with pytest.raises(ValueError, match=r"is not the one of --init_ckpt.*vocab_size: 1024 \(given\)"):
        run_in_process(finetune, flags_for(files, files["dir"] / "from_full", 1,
                                           f"--init_ckpt={files['dir'] / 'full'}", "--vocab_size=1024"))
    a, b = losses(full.rows), losses(resumed.rows)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # exact float equality, every step (1-3 from the first segment, 4-6 resumed)
    assert len(set(a.values())) == 6


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_checkpoints_hold_only_adapters_and_resume_identically(files, finetune):
    """A LoRA run's checkpoints skip the frozen base (reloaded from --init_ckpt), yet resuming is still
    bit-identical and a later run started from them sees the merged model."""
    import jax

    from dsjax import lora
    from dsjax.train import checkpointing, trainer

    d = files["dir"]
    base = run_in_process(finetune, flags_for(files, d / "lora_base", 2))
    lora_flags = (f"--init_ckpt={d / 'lora_base' / 'checkpoints'}", "--lora_rank=4", "--lora_targets=attn,shared")
    full = run_in_process(finetune, flags_for(files, d / "lora_full", 4, *lora_flags))
    run_in_process(finetune, flags_for(files, d / "lora_split", 2, *lora_flags))
    ck = checkpointing.TrainCheckpointer(str(d / "lora_split" / "checkpoints"))
    saved = ck.read_state()
    ck.close()
    assert "params" not in saved and "params_trained" not in saved and "lora" in saved  # sft: no base leaf
    step_bytes = _dir_bytes(d / "lora_split" / "checkpoints" / "2" / "state")
    base_bytes = _dir_bytes(d / "lora_base" / "checkpoints" / "2" / "state")
    assert step_bytes < 0.25 * base_bytes, (step_bytes, base_bytes)
    resumed = run_in_process(finetune, flags_for(files, d / "lora_split", 4, *lora_flags, "--resume"))
    assert losses(resumed.rows) == losses(full.rows)  # exact, steps 1-2 and 3-4
    for a, b in zip(jax.tree.leaves(resumed.state["lora"]), jax.tree.leaves(full.state["lora"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Starting from the LoRA run's checkpoints: its base (from the run it started from) + merged adapters.
    rc = trainer.RunConfig(train=None, data=None, tokenizer=None, steps=1, workdir="",
                           init_ckpt=str(d / "lora_full" / "checkpoints"))
    _, params = trainer.load_initial(rc)
    want = lora.merge(base.state["params"], full.state["lora"], full.config, lora.LoraConfig(rank=4, targets=(
        "attn", "shared")))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="different settings.*init_ckpt"):
        other_base = "--init_ckpt=" + str(d / "lora_full" / "checkpoints")
        run_in_process(finetune, flags_for(files, d / "lora_split", 6, other_base, *lora_flags[1:], "--resume"))
    # The base run continues: the adapters belong to its older step, which is no longer the latest.
    run_in_process(finetune, flags_for(files, d / "lora_base", 4, "--resume"))
    with pytest.raises(ValueError, match="different settings.*init_step: 2 -> 4"):
        run_in_process(finetune, flags_for(files, d / "lora_split", 6, *lora_flags, "--resume"))
    with pytest.raises(ValueError, match="has since moved to step 4"):
        trainer.load_initial(rc)


def test_sigterm_saves_then_resume_continues_identically(files, finetune, preempted):
    workdir, out, err, rc = preempted()
    assert rc == 0, err[-3000:]
    assert "preempted at step" in out, out
    k = int(out.split("preempted at step")[1].split()[0])
    assert k >= 3
    from dsjax.train import checkpointing, metrics

    assert checkpointing.TrainCheckpointer(str(workdir / "checkpoints")).latest_step() == k  # saved on SIGTERM
    assert (workdir / "loss_curve.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(workdir / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss", "ce", "mtp", "balance", "grad_norm", "lr", "tokens_per_s", "moe_load_max/layer_0"} <= tags
    assert [e.step for e in ea.Scalars("loss")][:k] == list(range(1, k + 1))
    # Resume the preempted run to k + 2 steps; compare with an uninterrupted in-process run.
    resumed = run_in_process(finetune, flags_for(files, workdir, k + 2, "--save_every=1000", "--resume"))
    ref = run_in_process(finetune, flags_for(files, files["dir"] / f"ref{k}", k + 2, "--save_every=1000"))
    got, want = losses(metrics.read_metrics(str(workdir / "metrics.jsonl"))), losses(ref.rows)
    assert resumed.step == k + 2
    assert {s: got[s] for s in want} == want


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_kill_helper.py"), str(d)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "SAVE_STARTED" in proc.stdout
    names = os.listdir(d)
    assert "1" in names and "2" not in names, names
    assert any(n.startswith("2.") and "tmp" in n for n in names), names  # killed mid-save: only a temp dir
    import grain
    import jax.numpy as jnp

    from dsjax.train.checkpointing import TrainCheckpointer

    ck = TrainCheckpointer(str(d), save_every=1)
    assert ck.latest_step() == 1
    it = iter(grain.MapDataset.range(100).to_iter_dataset().batch(2))
    like = {"step": jnp.int32(0), "w": jnp.zeros((2048, 2048)), "rng": jnp.zeros((2,), jnp.uint32)}
    state, meta = ck.restore(like, it)
    assert meta == {"step": 1} and int(state["step"]) == 1 and float(np.asarray(state["w"]).max()) == 1.0
    assert next(it).tolist() == [2, 3]  # the data position saved with step 1
    assert not any("tmp" in n for n in os.listdir(d))  # the partial save was cleaned up
    ck.close()


@pytest.mark.parametrize("args,needle", [
    (["--stage=pretrain"], "--stage"),
    (["--data=/nonexistent/file.jsonl"], "does not exist"),
    (["--seq_len=4096"], "max_position_embeddings"),
])
def test_script_reports_bad_flags_clearly(files, tmp_path, args, needle):
    argv = flags_for(files, tmp_path / "bad", 2) + args
    proc = subprocess.run([sys.executable, SCRIPT, *argv], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_shipped_flagfiles_parse(finetune, monkeypatch):
    """Every experiments/configs/*.flags file of finetune.py parses and builds a run config (from the repo root;
    generate_*.flags are generate.py's, *grpo*.flags grpo.py's: tests/test_grpo_run.py)."""
    monkeypatch.chdir(ROOT)
    cfg_dir = os.path.join(ROOT, "experiments", "configs")
    names = sorted(n for n in os.listdir(cfg_dir) if n.endswith(".flags") and not n.startswith("generate")
                   and "grpo" not in n)
    assert "kjv_tiny.flags" in names
    for name in names:
        finetune.FLAGS.unparse_flags()
        finetune.FLAGS(["finetune.py", f"--flagfile={os.path.join(cfg_dir, name)}"])
        if finetune.FLAGS.data[0].startswith("/path/to"):  # templates for the real model: flags only
            assert finetune.FLAGS.init_ckpt and finetune.FLAGS.mesh
            continue
        rc = finetune.build_run_config()
        assert rc.data.seq_len > (rc.model or __import__("dsjax").Config.preset("tiny", index_topk=64)).index_topk
