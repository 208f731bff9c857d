"""What every dsjax command line shares: quiet logs, `--verbose`, and each kind of failure as one line.

    if __name__ == "__main__":
        cli.run(main, "finetune.py")

`run` is `absl.app.run` with three changes:
  - a bad flag (unknown, unparsable, a required one missing) or an `app.UsageError` is one line naming the
    flag, not the whole flag list;
  - a library error (ValueError, which CheckpointError is; FloatingPointError, NotImplementedError), an OSError (a full disk, a read-only or unwritable folder) and an XLA runtime
    error (out of memory) are one line each on stderr and exit status 1 (2 for usage), no traceback;
  - Orbax / absl INFO logging is off unless --verbosity is given; `--verbose` shows tracebacks instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging as absl_logging

_DISK_FULL = "No space left on device"  # as tensorstore words it (its errors are not OSErrors)
_READ_ONLY = "Read-only file system"


def describe(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug."""
    if isinstance(e, app.UsageError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or _DISK_FULL in str(e):
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        body = e.strerror if isinstance(e, OSError) and e.strerror and e.filename else text
        return (f"disk full{where}: {body}. Free space on that disk or choose a folder on another one; "
                "finished checkpoints are intact (unfinished writes are never visible).")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or _READ_ONLY in str(e):
        where = e.filename if isinstance(e, OSError) and e.filename else "the output folder"
        body = e.strerror if isinstance(e, OSError) and e.strerror else text
        return f"cannot write {where}: {body}. Choose a writable folder (--workdir / --out_dir)."
    if isinstance(e, (ValueError, FloatingPointError, NotImplementedError)):
        return str(e).strip() or text  # our messages; a list of problems keeps its lines
    if isinstance(e, OSError):
        return text
    if type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError"):
        hint = "; use a smaller batch / sequence or a bigger mesh" if "RESOURCE_EXHAUSTED" in text else ""
        return f"XLA: {text}{hint}"
    return None


def fail(prog: str, message: str, code: int = 1, *, now: bool = False) -> NoReturn:
    """Print the one line and exit. now=True skips interpreter teardown (os._exit): after a failed async
    write, tensorstore callbacks still pending would each print a traceback while the interpreter shuts down."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _parse_flags(prog: str) -> Callable[[Sequence[str]], list[str]]:
    def parse(argv: Sequence[str]) -> list[str]:
        try:
            return flags.FLAGS(list(argv))
        except flags.Error as e:
            fail(prog, f"{str(e).strip().splitlines()[0]} (see --helpshort)", 2)
    return parse


def quiet_logs() -> None:
    """Orbax and absl log every save / restore at INFO: keep to warnings unless --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        for name in ("orbax", "absl", "jax._src.xla_bridge"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_async_noise() -> None:
    """A failed async Orbax write is reported once, by the trainer (TrainCheckpointer.check). Its writer thread
    also logs the error with a traceback, and every tensorstore callback still pending then prints 'Event loop
    is closed' as an unraisable exception (92 tracebacks for one full disk): drop those two, nothing else."""
    logging.getLogger("absl").addFilter(
        lambda r: not (r.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (r.pathname or "")))
    previous = sys.unraisablehook

    def hook(u):  # tensorstore reports a failing callback as "unraisable"
        if u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    sys.unraisablehook = hook


def run(main: Callable[[list[str]], int | None], prog: str) -> None:
    """`absl.app.run(main)` with one-line errors (see the module docstring)."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show the traceback of an error instead of one line.")

    def wrapped(argv: list[str]) -> int | None:
        quiet_logs()
        if not flags.FLAGS.verbose:
            _quiet_async_noise()
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - expected failures become one line, bugs keep their traceback
            message = describe(e)
            if message is None or flags.FLAGS.verbose:
                raise
            fail(prog, message, 2 if isinstance(e, app.UsageError) else 1, now=True)

    app.run(wrapped, flags_parser=_parse_flags(prog))
