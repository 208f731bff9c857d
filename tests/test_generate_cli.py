"""experiments/generate.py end to end: a real process with 4 (CPU) devices restores a converted dsjax
checkpoint onto an expert x tensor mesh, encodes a V3.2 chat with a tokenizer, streams the answer and
prints tokens/s; its ids equal HF greedy decoding of the same weights."""

import os
import subprocess
import sys

import numpy as np
import pytest

import checkpoints
import dsjax
import hf_reference as H
from script_util import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "experiments", "generate.py")
WORDS = ["hello", "world", "what", "is", "the", "weather", "in", "paris", "?", "sunny", "rain", "and"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A word-level tokenizer with DeepSeek's special tokens at ids 0..5 and exactly the tiny model's 256 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                "</think>"]
    words = specials + WORDS + ["[UNK]"]
    vocab = {t: i for i, t in enumerate(words + [f"w{i}" for i in range(len(words), 256)])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(specials)
    path = tmp_path_factory.mktemp("cli_tok") / "tokenizer.json"
    t.save(str(path))
    return str(path)


def test_cli_chat_from_converted_checkpoint_on_a_mesh(hf_v32, tok_path, tmp_path):
    model, hf_dir = hf_v32
    cfg, params = checkpoints.load_hf(hf_dir)
    ckpt = str(tmp_path / "ckpt")
    checkpoints.save(ckpt, params, cfg)  # what `python -m checkpoints.convert` writes
    n_new = 8
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, CLI, f"--ckpt_dir={ckpt}", f"--tokenizer={tok_path}",
           "--chat=what is the weather in paris ?", "--system=hello", "--thinking", f"--max_new_tokens={n_new}", "--mesh=expert=2,tensor=2", "--print_ids"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    ids = [int(i) for i in next(l for l in lines if l.startswith("ids:"))[4:].split(",")]
    assert "tokens/s" in lines[-1] and "decode" in lines[-1]

    tok = dsjax.Tokenizer.from_file(tok_path)
    prompt = tok.encode_chat([{"role": "system", "content": "hello"},
                              {"role": "user", "content": "what is the weather in paris ?"}], thinking=True)
    assert prompt[0] == tok.bos_id and prompt[-1] == tok.token_to_id("<think>")
    seq = list(prompt)
    for _ in range(n_new):  # HF greedy, full forward recomputed each step
        seq.append(int(H.hf_logits(model, np.array([seq]))[0, -1].argmax()))
        if seq[-1] == tok.eos_id:
            break
    assert ids == seq[len(prompt):]
    streamed = tok.decode([i for i in ids if i != tok.eos_id])
    assert streamed and streamed in run.stdout


def test_cli_argument_errors(hf_v32):
    with load_script(CLI, "generate_cli") as cli:
        _, hf_dir = hf_v32
        with pytest.raises(cli.app.UsageError, match="exactly one of"):
            cli.load_model(hf_dir=hf_dir, config="tiny")
        cfg, params = cli.load_model(hf_dir=hf_dir, dtype="float32")
        assert cfg.dtype == "float32" and "moe" in params
        with pytest.raises(cli.app.UsageError, match="not axis=size"):
            cli.parse_mesh("expert2", cfg)
        with pytest.raises(cli.app.UsageError, match="needs 3 devices"):
            cli.parse_mesh("tensor=3", cfg)
        with pytest.raises(cli.app.UsageError, match="need --tokenizer"):
            cli.build_prompts(None, chats=["hi"])
        with pytest.raises(cli.app.UsageError, match="give a prompt"):
            cli.build_prompts(None)
