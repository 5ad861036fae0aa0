"""Refusals a user can act on, as one line; everything else keeps its traceback.

A command raises ``BadInput`` (a ``ValueError``) or ``MissingInput`` (a
``FileNotFoundError``) naming the file, row, flag or tensor and what to do.  ``run`` prints
such an error as ``error: ...`` on rank 0 only and exits with status 2; under torchrun the
other ranks exit quietly with the same status, and the message goes into torchrun's error
file, so its failure summary carries the sentence instead of ``error_file: <N/A>``.  An
unexpected exception still shows its traceback; ``--debug`` or ``ASCEND_PATCHES_DEBUG=1``
shows the traceback of a refusal too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


class UserError(Exception):
    """A refusal whose message says what is wrong and what to do."""


class BadInput(UserError, ValueError):
    pass


class MissingInput(UserError, FileNotFoundError):
    pass


class Exists(UserError, FileExistsError):
    pass


def _debug(argv) -> bool:
    return "--debug" in argv or os.environ.get("ASCEND_PATCHES_DEBUG", "").strip() in ("1", "true", "yes")


def _write_error_file(message: str) -> None:
    """torchrun's per-rank error file (TORCHELASTIC_ERROR_FILE): its failure summary shows it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"error: {message}",
                          "extraInfo": {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass


def run(main, argv=None):
    """``main(argv)``'s result; a ``UserError`` it raises becomes one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = _debug(argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except UserError as e:
        if debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _write_error_file(str(e))  # every rank: torchrun's summary names whichever failed first
        raise SystemExit(2) from None
