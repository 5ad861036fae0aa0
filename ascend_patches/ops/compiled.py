"""Kernels that ``torch.compile`` generates for the CPU: each op's forward or backward math
becomes one C++ loop over memory (inductor fuses the pointwise work, casts and reductions)
instead of the 4-10 eager passes the same math takes.  On a CPU those eager passes over
memory, not the FLOPs, are what RMSNorm, SwiGLU and RoPE cost in a training step.

Each op file keeps its compiled math next to its NPU and eager implementations; this
module only builds and caches the compiled callables, once per function.
"""

from __future__ import annotations

import torch

from .. import _state

_built = {}


def on() -> bool:
    """Whether the ops run their compiled CPU kernels (``compile_ops``; CPU only)."""
    s = _state.current()
    return s.compile_ops and s.backend == "cpu"


def kernel(fn):
    """``fn`` compiled (shapes specialise on first use, then go dynamic on a new shape)."""
    k = _built.get(fn)
    if k is None:
        k = _built[fn] = torch.compile(fn, fullgraph=True)
    return k


def run(fn):
    """``fn``'s compiled kernel with ``compile_ops`` on, else ``fn`` itself (eager)."""
    return kernel(fn) if on() else fn
