"""Megatron-Core's torch_dist checkpoint writer keeps its write results in a queue served by a
``multiprocessing`` manager process, started (by spawn) on the first save and kept for the
life of the rank.  A rank that is killed (kill -9, an OOM kill, a torchrun restart) cannot
stop it, so the manager, and multiprocessing's resource tracker that it holds open, outlive
the rank.  The replacement starts the same manager with the parent-death signal set
(Linux ``prctl(PR_SET_PDEATHSIG)``): it dies with its rank.  Elsewhere it is the stock one."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_managers = []  # the queue's proxy keeps the manager alive too; this keeps it findable


def die_with_parent(parent_pid: int) -> None:
    """Runs first in the manager process."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the rank died before the signal was set
        os._exit(0)


def results_queue_wrapper(original):
    """``filesystem_async``'s results-queue getter (``_get_write_results_queue()`` before
    megatron-core 0.17, ``get_write_results_queue(mp_mode='spawn')`` from 0.17): the
    module-level cached queue, its manager started with ``die_with_parent``."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async as module

    def get_write_results_queue(mp_mode: str = "spawn"):
        if getattr(module, "_results_queue", None) is None:
            manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
            manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
            _managers.append(manager)
            module._results_queue = manager.Queue()
        return module._results_queue

    get_write_results_queue.__wrapped__ = original
    get_write_results_queue.__name__ = original.__name__
    return get_write_results_queue
