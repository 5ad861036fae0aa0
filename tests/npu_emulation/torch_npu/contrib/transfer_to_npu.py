"""Emulated ``torch_npu.contrib.transfer_to_npu``.

The real module redirects torch.cuda.* calls and device="cuda" arguments to the NPU, and
the process-group backend megatron asks for ("nccl") to "hccl".  In the emulation the NPU
*is* the CPU, so the redirect it installs is the CPU device layer's
(``ascend_patches.device.cpu``) and a rename of "nccl" to the emulated "hccl", in a registry
of its own that ``undo()`` removes.
"""

from functools import partial

import torch

import torch_npu
from ascend_patches.collectives import backend_name_wrapper
from ascend_patches.device import cpu
from ascend_patches.registry import Patch, Registry
from ascend_patches.settings import Settings

_registry = Registry()
for _p in cpu.patches():
    if _p.name != "cpu.Tensor.type":  # the real redirect leaves Tensor.type alone
        _registry.declare(_p)
for _fn in ("init_process_group", "new_group"):
    _registry.declare(Patch(f"transfer_to_npu.{_fn}", f"torch.distributed:{_fn}",
                            wrapper=partial(backend_name_wrapper, accelerator_backend="hccl"),
                            backends=frozenset({"cpu"}), group="device", sweep=False,
                            why="transfer_to_npu turns the 'nccl' megatron asks for into 'hccl'"))
_registry.apply(Settings(backend="cpu"))
torch.npu = torch_npu.npu


def undo():
    _registry.revert()
    if getattr(torch, "npu", None) is torch_npu.npu:
        del torch.npu
