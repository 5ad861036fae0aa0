"""Keep freed memory in the process heap during CPU training.

glibc's malloc serves large blocks with a fresh ``mmap`` and returns them with ``munmap`` on
free.  A training step allocates and frees the same big tensors every step (logits and their
fp32 copies, activations, gradients, optimizer temporaries), so every step faults each of
their pages in again: hundreds of thousands of minor page faults per step at the CPU-sized
LLaMA shape (``bench/bench_pretrain.py`` counts them).  With ``mmap`` and heap trimming off,
freed blocks stay in the heap and later steps reuse pages already mapped, so after the
first step almost none fault.  The price: the process keeps its peak heap (plus what fragmentation adds while
it settles in the first step) instead of returning freed memory to the system.

Not applied on import (a converter streaming shards wants its memory back): the pretrain
recipe calls it on the CPU backend, and says so in its log.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_INT_MAX = 2 ** 31 - 1


def keep_freed_memory() -> str:
    """Turn off glibc's per-allocation mmap and heap trimming; returns what was done."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "allocator left as it is (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, _INT_MAX) != 1:
        return "allocator left as it is (mallopt refused)"
    return "freed memory kept in the heap for reuse (glibc mallopt: no mmap per block, no trimming)"
