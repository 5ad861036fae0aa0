"""Emulated ``torch_npu.contrib.transfer_to_npu``.

The real module redirects torch.cuda.* calls and device="cuda" arguments to the NPU.  In
the emulation the NPU *is* the CPU, so the redirect it installs is the CPU device layer's
(``ascend_patches.device.cpu``), in a registry of its own that ``undo()`` removes.
"""

import torch

import torch_npu
from ascend_patches.device import cpu
from ascend_patches.registry import Registry
from ascend_patches.settings import Settings

_registry = Registry()
for _p in cpu.patches():
    if _p.name != "cpu.Tensor.type":  # the real redirect leaves Tensor.type alone
        _registry.declare(_p)
_registry.apply(Settings(backend="cpu"))
torch.npu = torch_npu.npu


def undo():
    _registry.revert()
    if getattr(torch, "npu", None) is torch_npu.npu:
        del torch.npu
