"""Import an absl script (experiments/*.py) into the test process without leaking its flags.

absl flags live in one process-wide registry, so two scripts that both define e.g. `--config` cannot be
imported by the same pytest run; `load_script` removes the flags a script defined when the block ends (not
those of libraries it happened to import first)."""

from __future__ import annotations

import contextlib
import importlib.util
from types import ModuleType
from typing import Iterator

from absl import flags


@contextlib.contextmanager
def load_script(path: str, name: str) -> Iterator[ModuleType]:
    """Execute the script at `path` as module `name`; its flags are undefined again on exit."""
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        # Only the script's own flags: a library it imported first (grain, ...) keeps the flags it defined at
        # import, since it is not imported again and still reads them.
        # (absl records an exec'd script's flags as defined by importlib._bootstrap or the module's name)
        library = {f.name for m, fs in flags.FLAGS.flags_by_module_dict().items()
                   if m not in (name, "importlib._bootstrap", "__main__") for f in fs}
        for flag in set(flags.FLAGS) - before - library:
            if flag in flags.FLAGS:  # a flag's short name goes with its long one
                delattr(flags.FLAGS, flag)
