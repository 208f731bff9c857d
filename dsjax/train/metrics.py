"""Training metrics on disk: TensorBoard scalars, a JSONL log, and the loss-curve PNG.

The TensorBoard writer uses the `tensorboard` package's event-file writer directly (no TensorFlow needed);
`tensorboard --logdir WORKDIR/tensorboard` reads it. metrics.jsonl holds one line per step and is appended
to on resume, so it always covers the whole run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np


class ScalarWriter:
    """TensorBoard scalar summaries: `write(step, {"loss": 1.2, ...})`."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._w = EventFileWriter(logdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                          summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        self._w.close()


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host scalars from a step's metrics: per-layer arrays become `name/layer_i` (moe_load -> max/min)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = float(a)
        elif k == "moe_load":  # [L_moe, E] -> busiest / idlest expert share per layer, x E (1 = balanced)
            e = a.shape[-1]
            for i, row in enumerate(a.reshape(-1, e)):
                out[f"moe_load_max/layer_{i}"] = float(row.max() * e)
                out[f"moe_load_min/layer_{i}"] = float(row.min() * e)
        else:
            for i, x in enumerate(a.reshape(-1)):
                out[f"{k}/layer_{i}"] = float(x)
    return out


class MetricsLog:
    """Append-only JSONL of per-step scalars (what the loss curve and resume checks read)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self._f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl; a step logged twice (a resumed run redoing it) keeps the last row."""
    rows: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[r["step"]] = r
    return [rows[s] for s in sorted(rows)]


def plot_loss_curve(rows: list[Mapping[str, float]], path: str, title: str = "dsjax training") -> str:
    """Write the loss curve (total loss and each logged term) to a PNG; returns the path."""
    series = []
    for key in ("loss", "ce", "mtp", "indexer_kl", "mtp_indexer_kl"):
        pts = [(r["step"], r.get(key, np.nan)) for r in rows]
        if any(key in r for r in rows):
            series.append((key, pts, {"lw": 1.2 if key == "loss" else 0.9}))
    return plot_series(series, path, xlabel="step", ylabel="loss (nats / token)", title=title)


def plot_series(series: list[tuple[str | None, list[tuple[float, float]], Mapping[str, Any]]], path: str, *,
                xlabel: str, ylabel: str, title: str) -> str:
    """Line plot of (label or None: no legend entry, [(x, y), ...], matplotlib kwargs) series to a PNG
    (empty series skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, pts, kw in series:
        if pts:
            ax.plot(*zip(*pts), label=label if label is not None else "_nolegend_", **kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
