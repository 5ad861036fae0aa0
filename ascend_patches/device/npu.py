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


def with_npu_tensor_type(name: str):
    """A wrapper for megatron's module-level tuples of legacy tensor types
    (``_FLOAT_TYPES = (torch.FloatTensor, torch.cuda.FloatTensor)``): ``torch.npu.<name>`` added.
    transfer_to_npu makes ``torch.cuda.<name>`` the NPU's, but a tuple built when megatron was
    imported before it still holds CUDA's, and Float16Module would leave NPU inputs in fp32."""
    def wrap(original: tuple) -> tuple:
        import torch

        npu_type = getattr(torch.npu, name)
        return original if npu_type in original else tuple(original) + (npu_type,)

    return wrap
