"""The intra-op threads of a process that runs megatron's dynamic inference engine in a thread of
its own: ``MegatronAsyncLLM`` and ``MegatronLLM(use_coordinator=True)`` step the engine on an
event loop in a second thread (``recipes.serve`` runs it so).

libgomp, the OpenMP runtime of torch's CPU wheels, gives every thread that starts parallel work a
team of its own.  Once its teams hold more threads than the machine has CPUs it throttles the spin
of idle workers (GOMP's throttled spin count), so each parallel region wakes its workers from sleep.
A main thread that loaded the model with N threads, and an engine thread that then computes with N
more, cross that line on an N-CPU machine.  Measured here (2 CPUs, bench_serve's 16 prompts, 64
tokens each, MegatronLLM in direct mode, 3 runs each): 2.22 to 2.32 s when the main thread steps
the engine, 2.92 to 3.04 s when a second thread does, 2.05 to 2.24 s when a second thread does and
the main thread never had a team.

``hand_to_engine_thread()``: the main thread keeps one intra-op thread, before any parallel work
(the model's load), and the engine loop takes the count the process had when it starts in its
thread (the wrapper below, declared in ``patches.py``).  Without the call the wrapper changes
nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

_handed: Optional[int] = None


def hand_to_engine_thread() -> int:
    """Keep one intra-op thread in this (the main) thread and give the engine's loop thread the
    count this thread had; returns that count.  Call before the model loads."""
    global _handed
    if _handed is None:
        _handed = torch.get_num_threads()
    torch.set_num_threads(1)
    return _handed


def engine_thread_count() -> int:
    """The intra-op threads the engine computes with: the handed count, or this thread's own."""
    return _handed if _handed is not None else torch.get_num_threads()


def engine_loop_wrapper(original):
    """``DynamicInferenceEngine.run_engine_with_coordinator``, first taking the handed intra-op
    threads in the thread the loop runs in."""

    async def run_engine_with_coordinator(self, *args, **kwargs):
        if _handed is not None:
            torch.set_num_threads(_handed)
        return await original(self, *args, **kwargs)

    run_engine_with_coordinator.__wrapped__ = original
    return run_engine_with_coordinator
