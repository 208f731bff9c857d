"""Timing and profiling helpers shared by the experiments/ benchmarks."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds of `fn()` (which must block until its result is ready) over `repeats`
    calls, after one warm-up call that also compiles."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def wide_dsa_config(index_topk: int, heads: int = 32, **overrides: Any):
    """The long-context benchmark model: V3.2's per-(query, key) cost ratio of MLA to the indexer,
    H·(2·C + Dr) / (Hi·Di) = 128·1088 / (64·128) = 17 (here H·544 / (H/4·128), H = `heads`), 2 layers
    (one dense, one MoE) and a thin MoE, vocabulary and hidden size, so attention dominates at long L as
    it does in the real model. The `small` preset instead has 8 heads over a 128-wide latent (ratio 4.5)."""
    import dsjax

    kw = dict(vocab_size=2048, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=heads,
              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, index_n_heads=heads // 4,
              index_head_dim=128, index_topk=index_topk, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
              topk_group=2, moe_intermediate_size=128, intermediate_size=512, max_position_embeddings=65536,
              num_nextn_predict_layers=0)
    return dsjax.Config.preset("small", **{**kw, **overrides})


# ------------------------------------------------------------------------------------------ --profile
# The named scopes of dsjax's sub-blocks (`jax.named_scope` in attention, indexer, moe, model, mtp).
SCOPES = ("embed", "attn_proj", "indexer_proj", "indexer_topk", "sparse_mla", "dense_mla", "indexer_kl",
          "attn_out", "moe_route", "moe_dispatch", "experts", "shared_expert", "mlp", "final_norm", "lm_head",
          "mtp", "attention", "moe")
PROFILE_XLA_FLAG = "--xla_cpu_enable_xprof_traceme=true"  # XLA:CPU traces every op (thunk) it runs


def enable_op_tracing() -> None:
    """Call before jax starts its backend: XLA:CPU then emits a trace event per executed op."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + PROFILE_XLA_FLAG).strip()


def _op_scopes(hlo_texts: list[str]) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (`jit(f)/attention/attn_proj/dot_general`)."""
    out = {}
    for text in hlo_texts:
        for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", text):
            out.setdefault(m.group(1), m.group(2))
    return out


def _scope_of(op_name: str) -> str:
    """The innermost dsjax named scope on an op's path ("other" when none): a profile reads by block."""
    parts = [p for p in op_name.split("/") if p in SCOPES]
    return parts[-1] if parts else "other"


def profile_scopes(run: Callable[[], object], compiled_texts: list[str], logdir: str,
                   repeats: int = 3) -> list[tuple[str, float, float]]:
    """Run `run()` `repeats` times under `jax.profiler.trace(logdir)` and add up each op's self time by
    named scope. compiled_texts: `compiled.as_text()` of the functions `run` calls (op -> scope map).
    Returns [(scope, ms per run, share)] sorted by time; the trace stays in `logdir` (TensorBoard / Perfetto)."""
    import jax

    run()  # compile outside the trace
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(repeats):
            run()
    path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
              if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    scopes = _op_scopes(compiled_texts)
    totals: dict[str, float] = {}
    by_thread: dict[Any, list[dict]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():  # self time: an op (e.g. a while loop) minus the ops nested inside it
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        self_us = [float(e["dur"]) for e in evs]
        stack: list[int] = []
        for i, e in enumerate(evs):
            while stack and e["ts"] >= evs[stack[-1]]["ts"] + evs[stack[-1]]["dur"]:
                stack.pop()
            if stack:
                self_us[stack[-1]] -= e["dur"]
            stack.append(i)
        for e, us in zip(evs, self_us):
            key = _scope_of(scopes.get(e["args"]["hlo_op"], ""))
            totals[key] = totals.get(key, 0.0) + us
    total = sum(totals.values()) or 1.0
    rows = [(k, v / 1e3 / repeats, v / total) for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def print_profile(title: str, rows: list[tuple[str, float, float]], top: int = 12) -> None:
    print(f"\n## Profile: {title} (XLA:CPU op self time by named scope)")
    print("| scope | ms / call | share |\n|---|---|---|")
    for name, ms, share in rows[:top]:
        print(f"| {name} | {ms:.2f} | {100 * share:.1f}% |")
