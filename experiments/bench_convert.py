"""Conversion benchmark: HF safetensors -> dsjax Orbax checkpoint, against reading the same files.

    python experiments/bench_convert.py [--layers=6] [--experts=128] [--fp8] [--keep_fp8] [--compress]

A synthetic checkpoint in the official layout (`checkpoints.synthetic`, wide like the 671B model: most
bytes in many small experts; BF16, or e4m3 + block scales with --fp8) is written to --workdir, then:

  raw read (dsjax)        every tensor read once with checkpoints' pread reader
  raw read (safetensors)  the peer: safetensors.safe_open(framework="pt") reading every tensor
  convert (streamed)      checkpoints.convert.convert in a fresh process (import time excluded)
  export (streamed)       checkpoints.export.export of that checkpoint back to HF safetensors
  convert (eager, peer)   what an eager converter does: load all tensors, transpose, one Orbax save

Each row: seconds, GB/s of the source checkpoint's size, the ratio to the dsjax raw read, and the
process' peak RSS.
The files were just written, so reads come from the page cache: the ratios show conversion overhead,
not disk speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 6, "num_hidden_layers of the synthetic model (1 dense, the rest MoE).")
flags.DEFINE_integer("experts", 128, "Routed experts per MoE layer.")
flags.DEFINE_bool("fp8", False, "Write the synthetic checkpoint in the official block-FP8 layout.")
flags.DEFINE_bool("keep_fp8", False, "Convert with --keep_fp8 (else FP8 is dequantised to bf16).")
flags.DEFINE_bool("compress", True, "zstd-compress chunks (Orbax's default).")
flags.DEFINE_integer("threads", 2, "Reader threads of the streamed conversion.")
flags.DEFINE_integer("inflight_mb", 512, "In-flight budget of the streamed conversion.")
flags.DEFINE_bool("skip_eager", False, "Skip the eager peer (it needs RAM for the whole model).")
flags.DEFINE_string("workdir", None, "Where to write the checkpoints (default: a temp dir, deleted after).")

_CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
args = json.loads(sys.argv[1])
if args["mode"] == "stream":
    from checkpoints import convert
    t = time.perf_counter()
    convert.convert(args["src"], args["out"], dtype="bfloat16", keep_fp8=args["keep_fp8"], threads=args["threads"],
                    inflight_mb=args["inflight_mb"], compress=args["compress"], progress=False)
elif args["mode"] == "export":  # src: the streamed conversion's output
    from checkpoints import export
    t = time.perf_counter()
    export.export(args["src"], args["out"], keep_fp8=args["keep_fp8"], threads=args["threads"], progress=False)
else:  # eager peer: the whole model in host memory, then one Orbax save
    import numpy as np, orbax.checkpoint as ocp, torch
    from safetensors import safe_open
    from checkpoints.safetensors_io import CheckpointReader
    t = time.perf_counter()
    tree = {{}}
    for f in CheckpointReader(args["src"]).files():
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                x = sf.get_tensor(k)
                if x.dtype == torch.float8_e4m3fn:
                    x = x.float()  # dequantise (scale multiply omitted: a lower bound on the peer's cost)
                x = x.to(torch.bfloat16) if x.dtype != torch.float32 else x
                a = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
                tree[k.replace(".", "__")] = np.ascontiguousarray(a.T) if a.ndim == 2 else a
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=args["compress"])).save(args["out"], tree)
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
'''


def _child(mode: str, src: str, out: str) -> dict:
    args = dict(mode=mode, src=src, out=out, keep_fp8=FLAGS.keep_fp8, threads=FLAGS.threads,
                inflight_mb=FLAGS.inflight_mb, compress=FLAGS.compress)
    r = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT), json.dumps(args)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _raw_reads(src: str) -> tuple[float, float, float]:
    from safetensors import safe_open

    from checkpoints.safetensors_io import CheckpointReader

    reader = CheckpointReader(src)
    t = time.perf_counter()
    n = sum(reader.read(k).nbytes for k in reader.keys())
    ours = time.perf_counter() - t
    t = time.perf_counter()
    for f in reader.files():
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                sf.get_tensor(k)
    peer = time.perf_counter() - t
    return n, ours, peer


def main(argv):
    del argv
    from checkpoints import synthetic

    work = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "hf")
    cfg = synthetic.wide_config(n_routed_experts=FLAGS.experts, num_hidden_layers=FLAGS.layers)
    try:
        if not os.path.exists(os.path.join(src, "config.json")):
            t = time.perf_counter()
            synthetic.write(src, cfg, fp8_weights=FLAGS.fp8)
            print(f"wrote synthetic checkpoint in {time.perf_counter() - t:.1f}s")
        n, ours, peer = _raw_reads(src)
        gb = n / 1e9
        rows = [("raw read (dsjax pread)", ours, None), ("raw read (safetensors, peer)", peer, None)]
        ckpt = os.path.join(work, "out_stream")
        for mode, label, inp in [("stream", "convert (streamed, dsjax)", src),
                                 ("export", "export back to HF (streamed, dsjax)", ckpt),
                                 ("eager", "convert (eager load + save, peer)", src)]:
            if mode == "eager" and FLAGS.skip_eager:
                continue
            out = os.path.join(work, f"out_{mode}")
            shutil.rmtree(out, ignore_errors=True)
            r = _child(mode, inp, out)
            rows.append((label, r["seconds"], r["rss"]))
            if mode != "stream":
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        kind = "FP8 (e4m3 + scales)" if FLAGS.fp8 else "BF16"
        how = "kept FP8" if FLAGS.keep_fp8 and FLAGS.fp8 else "bf16"
        print(f"\nsource: {gb:.2f} GB {kind}, {len(os.listdir(src)) - 2} shards; output {how}, "
              f"compress={FLAGS.compress}, threads={FLAGS.threads}, inflight={FLAGS.inflight_mb} MB, "
              f"{os.cpu_count()} CPUs")
        print(f"| {'step':<36} | {'seconds':>8} | {'GB/s':>6} | {'vs raw read':>11} | {'peak RSS GB':>11} |")
        print(f"|{'-' * 38}|{'-' * 10}|{'-' * 8}|{'-' * 13}|{'-' * 13}|")
        for label, sec, rss in rows:
            rss_s = "-" if rss is None else f"{rss / 1e9:.2f}"
            print(f"| {label:<36} | {sec:8.2f} | {gb / sec:6.2f} | {ours / sec:10.2f}x | {rss_s:>11} |")
    finally:
        if FLAGS.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
