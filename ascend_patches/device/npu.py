"""The NPU device layer: torch_npu's own ``transfer_to_npu`` plus the Megatron fixes it lacks.

``transfer_to_npu`` redirects ``torch.cuda.*``, ``device="cuda"`` arguments and the default
process-group backend to the NPU.  It does not know Megatron's private RNG helpers, which
reach into ``torch.cuda.default_generators``, nor Megatron's literal
``'torch.cuda.FloatTensor'`` type checks; those are patched here (see ``rng.py`` and
``cpu.tensor_type_wrapper``).
"""

from __future__ import annotations

import importlib


def activate_transfer_to_npu() -> str:
    """Import torch_npu's redirect (it acts on import and cannot be undone)."""
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return "torch_npu.contrib.transfer_to_npu imported (redirects torch.cuda to the NPU; not revertible)"
