"""Refusals a user can act on, as one line; everything else keeps its traceback.

A command raises ``BadInput`` (a ``ValueError``), ``MissingInput`` (a ``FileNotFoundError``)
or ``Exists`` (a ``FileExistsError``) naming the file, row, flag or tensor and what to do;
``ascend_patches`` raises ``ascend_patches.ConfigurationError`` for a bad setting.  Importing
``recipes`` installs ``excepthook``: such an error prints as ``error: ...`` on rank 0 only,
every rank exits with status 2, and the message goes into torchrun's error file, so its
failure summary carries the sentence instead of ``error_file: <N/A>``.  An unexpected
exception still shows its traceback; ``--debug`` or ``ASCEND_PATCHES_DEBUG=1`` shows the
traceback of a refusal too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class UserError(Exception):
    """A refusal whose message says what is wrong and what to do."""


class BadInput(UserError, ValueError):
    pass


class MissingInput(UserError, FileNotFoundError):
    pass


class Exists(UserError, FileExistsError):
    pass


def is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    from ascend_patches import ConfigurationError

    return isinstance(exc, ConfigurationError)


def debug() -> bool:
    return "--debug" in sys.argv or os.environ.get("ASCEND_PATCHES_DEBUG", "").strip().lower() in ("1", "true", "yes")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's fixed default; a flag whose default is None either says in its help
    where the default comes from (per --model) or has none."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are refusals like any other: one line (on rank 0 under
    torchrun) instead of the whole usage block from every rank; defaults shown in --help;
    and ``--debug``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the Python traceback of a refusal (also ASCEND_PATCHES_DEBUG=1)")

    def error(self, message):
        raise BadInput(f"{self.prog}: {message} (see --help)")


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


def excepthook(exc_type, exc, tb, _previous=[]) -> None:
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
    """For the commands (``python -m recipes...`` / ``converters...``): uncaught refusals as one line."""
    if sys.excepthook is not excepthook:
        excepthook.__defaults__[0][:] = [sys.excepthook]
        sys.excepthook = excepthook
