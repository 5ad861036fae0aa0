"""The one refusal hook: an error a user can act on prints as one line, not a traceback.

``import ascend_patches`` installs it.  A refusal is an exception of a type registered with
``register`` (``ConfigurationError`` for a bad ASCEND_PATCHES_* setting; the recipes and
converters register theirs).  Uncaught, it prints ``error: ...`` on rank 0 only, goes into
torchrun's per-rank error file (so torchrun's failure summary carries the sentence instead of
``error_file: <N/A>``), and every rank exits with status 2.  Any other exception keeps its
traceback, and ``--debug`` or ``ASCEND_PATCHES_DEBUG=1`` shows a refusal's traceback too.

This module imports nothing of the package, so a command that never needs the patches
(``recipes.preprocess_data``: importing ascend_patches applies them, seconds of start-up) can
load it alone; it is the same module object either way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Tuple, Type

_refusals: Tuple[Type[BaseException], ...] = ()
_previous = []  # the hook that was installed before this one


def register(*types: Type[BaseException]) -> None:
    """Make uncaught exceptions of these types print as one line."""
    global _refusals
    _refusals = _refusals + tuple(t for t in types if t not in _refusals)


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, _refusals)


def debug() -> bool:
    return "--debug" in sys.argv or os.environ.get("ASCEND_PATCHES_DEBUG", "").strip().lower() in ("1", "true", "yes")


def _write_error_file(message: str) -> None:
    """torchrun's per-rank error file (TORCHELASTIC_ERROR_FILE), which its failure summary shows."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                             "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass


def excepthook(exc_type, exc, tb) -> None:
    if not is_refusal(exc) or debug():
        return (_previous[0] if _previous else sys.__excepthook__)(exc_type, exc, tb)
    message = f"error: {exc}"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:  # the real stderr: torch.distributed's excepthook wrapper has swapped in a buffer
        print(message, file=sys.__stderr__, flush=True)
    _write_error_file(message)  # every rank: torchrun's summary names whichever failed first
    if rank != 0:
        # a refusal is the same on every rank: let rank 0 say it before torchrun, seeing this
        # rank exit, stops the others (its summary shows this rank's error file if rank 0 had none)
        time.sleep(3)
    sys.stdout.flush()
    sys.__stderr__.flush()
    os._exit(2)  # no per-rank traceback, no atexit noise from half-built process groups


def install() -> None:
    if sys.excepthook is not excepthook:
        _previous[:] = [sys.excepthook]
        sys.excepthook = excepthook
