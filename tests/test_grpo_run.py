"""The GRPO loop (`dsjax.train.rl.run`) and its script (`experiments/grpo.py`): a run that stops and resumes
ends bit-identical to one that did not; the metrics the issue names are logged (TensorBoard, JSONL, PNG);
KL and clipping engage (LoRA reference, two updates per rollout); the script's demonstration runs end to end
with its last line `held-out accuracy: BEFORE -> AFTER`; bad input is one line."""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import addition_task  # noqa: E402
from dsjax import lora  # noqa: E402
from dsjax.train import TrainCheckpointer, grpo, rewards, rl, schedule, step  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
STEPS = 4


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return addition_task.write(str(tmp_path_factory.mktemp("task")), digits=1, heldout=16)


def _config(task, workdir, steps, **kw):
    tc = step.TrainConfig(
        stage="grpo", remat=None, bias_update_rate=0.0, lora=lora.LoraConfig(rank=4, targets=("attn", "experts")),
        grpo=grpo.GRPOConfig(group_size=4, kl_beta=0.05, temperature=1.0, offpolicy_delta=0.5),
        optim=schedule.OptimConfig(learning_rate=3e-2, warmup_steps=0, total_steps=2 * STEPS, weight_decay=0.0))
    return rl.RLConfig(train=tc, prompts=task["prompts"], tokenizer=task["tokenizer"], steps=steps,
                       workdir=str(workdir), model=addition_task.model_config(1), prompts_per_step=4,
                       max_new_tokens=3, top_k=8, updates_per_rollout=2, eval_prompts=task["heldout"],
                       eval_every=2, save_every=2, progress=False, seed=3, **kw)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_is_bit_identical_and_metrics_are_logged(task, tmp_path):
    reward = rewards.combine((rewards.exact_answer(), 1.0), (rewards.length_penalty(1, per_char=0.1), 1.0))
    acc = rewards.exact_answer()
    straight = rl.run(_config(task, tmp_path / "a", STEPS), reward, acc)
    first = rl.run(_config(task, tmp_path / "b", STEPS // 2), reward, acc)
    assert first.step == STEPS // 2
    resumed = rl.run(_config(task, tmp_path / "b", STEPS, resume=True), reward, acc)
    assert resumed.step == straight.step == STEPS and int(resumed.state["step"]) == 2 * STEPS
    for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)  # params, adapters, Adam moments, RNG: bit for bit
    timing = ("rollout_s", "train_s")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in res.rows] for res in (straight, resumed)]
    assert rows[0] == rows[1]  # the same rollouts, rewards and metrics at every step

    rows = straight.rows
    assert [r["step"] for r in rows] == list(range(STEPS + 1)) and set(rows[0]) == {"step", "heldout_accuracy"}
    for key in ("reward_mean", "reward_std", "accuracy", "kl", "clip_fraction", "masked_sequences", "loss",
                "groups_with_signal", "completion_tokens"):
        assert all(np.isfinite(r[key]) for r in rows[1:]), key
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [0, 2, 4]
    # the second update of each rollout batch is off-policy: the adapters moved, so KL and the ratio do too
    assert rows[-1]["kl"] > 0 and any(r["clip_fraction"] > 0 for r in rows[1:])
    assert all(0 <= r["accuracy"] <= 1 and r["reward_mean"] <= r["accuracy"] + 1e-6 for r in rows[1:])
    assert os.path.getsize(straight.paths["curve"]) > 1000
    assert glob.glob(os.path.join(straight.paths["tensorboard"], "events.out.tfevents.*"))
    ck = TrainCheckpointer(straight.paths["checkpoints"])
    assert ck.all_steps()[-2:] == [2, 4] and ck.read_meta()["rl"]["updates_per_rollout"] == 2
    ck.close()

    # the user's path: the run's checkpoints load as a model (the adapters merged into the base they trained)
    import checkpoints

    config, params = checkpoints.load(straight.paths["checkpoints"])
    want = lora.merge(straight.state["params"], straight.state["lora"], config, _config(task, tmp_path, 1).train.lora)
    for a, b in zip(_leaves(params), _leaves(want)):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="different settings.*rl.top_k"):
        rl.run(dataclasses.replace(_config(task, tmp_path / "b", STEPS + 2, resume=True), top_k=4), reward, acc)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        rl.run(_config(task, tmp_path / "a", STEPS + 2), reward, acc)


def test_prompt_records_are_checked(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"answer": "3"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: a prompt record needs 'prompt'"):
        rl.read_prompts(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"p.jsonl line 1: not valid JSON"):
        rl.read_prompts(str(bad))


def _script(*args, timeout=900):
    return subprocess.run([sys.executable, "experiments/grpo.py", "--noprogress", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_script_demonstration_end_to_end(tmp_path):
    """The shipped demonstration at toy length: SFT start, GRPO, evaluation; then the trained policy loads."""
    w = tmp_path / "w"
    p = _script(f"--workdir={w}", "--digits=1", "--heldout=16", "--sft_steps=30", "--steps=3", "--eval_every=3",
                "--prompts_per_step=4", "--group_size=4", "--save_every=3")
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"held-out accuracy: (\d\.\d{3}) -> (\d\.\d{3})", last)
    assert m, last
    rows = [json.loads(x) for x in open(w / "grpo" / "metrics.jsonl")]
    assert rows[0]["heldout_accuracy"] == float(m.group(1)) and rows[-1]["heldout_accuracy"] == float(m.group(2))
    assert (w / "grpo" / "grpo_curve.png").stat().st_size > 1000
    import checkpoints

    config, params = checkpoints.load(str(w / "grpo" / "checkpoints"))  # what generate / export read
    assert config.vocab_size == addition_task.model_config(1).vocab_size

    again = _script(f"--workdir={w}", "--digits=1", "--heldout=16", "--sft_steps=30", "--steps=3")
    assert again.returncode == 1 and "pass --resume" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("args,needle", [
    (["--task=file"], "--task=file needs --init_ckpt"),
    (["--prompts=x.jsonl"], "--prompts is for --task=file"),
    (["--steps=0"], "--steps=0 must be >= 1"),
    (["--group_size=1"], "group_size=1: GRPO needs at least 2"),
    (["--kl_beta=0.1"], "a KL penalty (kl_beta > 0) needs LoRA"),
    (["--reward_fn=nope:fn"], "--reward_fn='nope:fn'"),
])
def test_script_bad_flags_are_one_line(tmp_path, args, needle):
    p = _script(f"--workdir={tmp_path / 'w'}", "--sft_steps=1", *args, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert any(needle in ln for ln in err), p.stderr[-2000:]


def test_v32_flagfile_parses_and_is_the_planned_step():
    """The 671B LoRA flagfile is valid for the script (objective, LoRA, rewards) and describes the step its
    header's plan.py command planned: mesh, rows (prompt + completion), rollouts per step, LoRA, KL."""
    from absl import flags

    from script_util import load_script

    path = os.path.join(ROOT, "experiments", "configs", "v32_grpo_lora.flags")
    text = open(path).read()
    cmd = re.search(r"plan\.py --mode=grpo ([^\n]*)", text.replace("\\\n#", "")).group(1)  # joined lines
    plan = dict(re.findall(r"--(\w+)=(\S+)", cmd))
    with load_script(os.path.join(ROOT, "experiments", "grpo.py"), "grpo_script") as mod:
        FLAGS = flags.FLAGS
        try:
            FLAGS(["grpo.py", f"--flagfile={path}"])
            tc = mod.train_config(FLAGS.steps)
            reward, accuracy = mod.reward_functions()
            got = {"mesh": FLAGS.mesh, "lora_rank": str(FLAGS.lora_rank), "lora_targets": ",".join(FLAGS.lora_targets),
                   "kl_beta": str(FLAGS.kl_beta),
                   "batch": str(FLAGS.prompts_per_step * FLAGS.group_size // FLAGS.grad_accum),
                   "seq_len": str(rl.row_length([[0] * FLAGS.max_prompt_tokens], FLAGS.max_new_tokens))}
        finally:
            FLAGS.unparse_flags()
    assert {k: plan[k] for k in got} == got
    assert tc.lora.rank == 16 and tc.grpo.kl_beta > 0 and tc.grpo.offpolicy_delta is not None
    done = "Adding: 40 + 2 = \\boxed{42}."
    assert accuracy("", done, {"answer": "42"}) == 1.0 and accuracy("", "42", {"answer": "42"}) == 0.0
    assert reward("", done, {"answer": "42"}) == pytest.approx(1.1)


def test_plan_grpo_mode_compiles_the_step():
    """plan.py --mode=grpo compiles dsjax's own GRPO step (LoRA, KL reference, replayed selection) on a mesh."""
    p = subprocess.run([sys.executable, "experiments/plan.py", "--config=tiny", "--mesh=expert=4,data=2", "--mode=grpo",
                        "--seq_len=128", "--batch=8", "--kl_beta=0.01", "--hbm_gb=1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = dict(re.findall(r"^\s+(params|rollout batch|total)\s+([\d.]+)$", p.stdout, re.M))
    assert set(rows) == {"params", "rollout batch", "total"} and "fits 1 GB HBM: YES" in p.stdout, p.stdout
