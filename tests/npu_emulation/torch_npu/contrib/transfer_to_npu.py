"""Emulated ``torch_npu.contrib.transfer_to_npu``.

The real module redirects torch.cuda.* calls and device="cuda" arguments to the NPU, and wraps
``torch.distributed.init_process_group`` and ``distributed_c10d._new_group_with_tag`` (what
``new_group`` calls) in ``_wrapper_hccl``, which turns "nccl" in any string argument and in
``backend=`` into "hccl" (``HCCL_RENAMED``: the targets as torch-npu 2.14.0's source has them;
``tests/test_torch_npu_contract.py`` reads them off the wheel).  In the emulation the NPU *is*
the CPU, so the device redirect it installs is the CPU device layer's
(``ascend_patches.device.cpu``), and the wrapper renames "nccl" only (the real one's "cuda" ->
"npu" rename would name a device the emulation does not have).  ``undo()`` removes it all.
"""

import functools

import torch

import torch_npu
from ascend_patches.device import cpu
from ascend_patches.registry import Patch, Registry
from ascend_patches.settings import Settings

HCCL_RENAMED = ("torch.distributed:init_process_group", "torch.distributed.distributed_c10d:_new_group_with_tag")


def _wrapper_hccl(fn):
    @functools.wraps(fn)
    def decorated(*args, **kwargs):
        args = [a.replace("nccl", "hccl") if type(a) is str else a for a in args]
        if type(kwargs.get("backend")) is str:
            kwargs["backend"] = kwargs["backend"].replace("nccl", "hccl")
        return fn(*args, **kwargs)

    return decorated


_registry = Registry()
for _p in cpu.patches():
    if _p.name != "cpu.Tensor.type":  # the real redirect leaves Tensor.type alone
        _registry.declare(_p)
for _target in HCCL_RENAMED:
    _registry.declare(Patch(f"transfer_to_npu.{_target.split(':')[1]}", _target, wrapper=_wrapper_hccl,
                            backends=frozenset({"cpu"}), group="device", sweep=False,
                            why="transfer_to_npu turns the 'nccl' megatron asks for into 'hccl'"))
_registry.apply(Settings(backend="cpu"))
torch.npu = torch_npu.npu


def undo():
    _registry.revert()
    if getattr(torch, "npu", None) is torch_npu.npu:
        del torch.npu
