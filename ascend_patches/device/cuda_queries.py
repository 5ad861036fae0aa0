"""``torch.cuda.is_available()`` / ``device_count()`` answered for named callers only.

Off CUDA those queries answer truthfully (False, 0) and everything in torch relies on that.
Some callers must hear otherwise to run on the device this process does have: Megatron-LM's
training initialisation (always, on the CPU backend), and, in the opt-in test mode
``answer_cuda_queries``, Megatron-Core and its unit tests.  A caller is the first frame
outside ascend_patches, matched by its module's name, so the answers chain with each other
and stay invisible to every other module.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable


def caller_module() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("ascend_patches"):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def answer(prefixes, value: Callable[[], object]):
    """A wrapper for a query function: ``value()`` for callers in ``prefixes``, else the original."""

    def wrapper(original):
        def query(*args, **kwargs):
            return value() if _matches(caller_module(), prefixes) else original(*args, **kwargs)

        query.__wrapped__ = original
        query.__name__ = original.__name__
        return query

    return wrapper


def local_world_size() -> int:
    """One device per local rank, as on a GPU node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


MEGATRON_LM_INIT = ("megatron.training.initialize",)
TEST_MODE = ("megatron", "tests")
