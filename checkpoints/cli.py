"""What the checkpoint command lines share: quiet logging, and bad input as one message, not a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from checkpoints.safetensors_io import CheckpointError


def run(prog: str, job: Callable[[], str]) -> None:
    """Run `job` (returns a one-line summary) as `python -m checkpoints.<prog>`; exit 1 on CheckpointError."""
    from absl import flags, logging as absl_logging

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every step at INFO: keep to warnings and the bar
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        summary = job()
    except CheckpointError as e:
        print(f"checkpoints.{prog}: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary)
