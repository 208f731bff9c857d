"""Free space is checked before a big write starts, so a full disk is one clear error up front rather than a
write that dies half way (convert, export, checkpoints.save, each training checkpoint).

DSJAX_MIN_FREE_MB (environment): space to leave free beyond the write itself (default 0); a negative value
turns the check off.
"""

from __future__ import annotations

import errno
import os
import shutil


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def require_free(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise OSError(ENOSPC) naming `path` if its disk has less than `need_bytes` (+ the reserve) free."""
    reserve_mb = int(os.environ.get("DSJAX_MIN_FREE_MB", "0") or 0)
    if reserve_mb < 0:
        return
    where = _existing(os.fspath(path))
    free = shutil.disk_usage(where).free
    need = int(need_bytes) + (reserve_mb << 20)
    if free < need:
        extra = f" (+ DSJAX_MIN_FREE_MB={reserve_mb} kept free)" if reserve_mb else ""
        raise OSError(errno.ENOSPC, f"{what} needs {need_bytes / 1e6:,.1f} MB{extra} but only {free / 1e6:,.1f} MB "
                                    "are free there; nothing was written", where)
