"""Refusals a user can act on, as one line; everything else keeps its traceback.

A command raises ``BadInput`` (a ``ValueError``), ``MissingInput`` (a ``FileNotFoundError``)
or ``Exists`` (a ``FileExistsError``) naming the file, row, flag or tensor and what to do.
They are registered with ascend_patches' refusal hook (``ascend_patches.refusals``), which
prints them as one ``error: ...`` line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


class UserError(Exception):
    """A refusal whose message says what is wrong and what to do."""


class BadInput(UserError, ValueError):
    pass


class MissingInput(UserError, FileNotFoundError):
    pass


class Exists(UserError, FileExistsError):
    pass


def _refusal_hook():
    """ascend_patches' refusal hook, without importing ascend_patches where nothing has yet
    (its import applies the patches: seconds that preprocess_data has no use for)."""
    name = "ascend_patches.refusals"
    if name not in sys.modules:
        if "ascend_patches" in sys.modules:
            import ascend_patches.refusals  # noqa: F401
        else:
            here = Path(importlib.util.find_spec("ascend_patches").origin).parent / "refusals.py"
            spec = importlib.util.spec_from_file_location(name, here)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return sys.modules[name]


_hook = _refusal_hook()
_hook.register(UserError)
_hook.install()


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
