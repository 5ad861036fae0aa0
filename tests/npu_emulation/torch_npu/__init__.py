"""A strict plain-torch emulation of the torch_npu that ascend_patches calls.  TESTS ONLY.

It lives under tests/ and is put into ``sys.modules['torch_npu']`` by a test fixture, or first
on ``PYTHONPATH`` for a command; it is never shipped.  Its contract is the real wheel's
(torch-npu 2.14.0, read by ``tests/helpers/torch_npu_wheel.py``): each op is
``torch.ops.npu.<op>`` under the registered schema (``npu_emulated_ops``), ``transfer_to_npu``
follows the wheel's Python.  The device is ``npu``, torch's PrivateUse1 renamed as the wheel
renames it, with its data in CPU memory (``device``); ``EMULATED_NPU_DEVICE=0`` falls back to
the older mode in which the NPU is the CPU.  The numerics are plain torch on the CPU.
"""

from __future__ import annotations

import os as _os

import torch

import npu_emulated_ops as _ops
from . import device, npu  # noqa: F401  (torch_npu.npu namespace)

__version__ = "2.14.0+emulated"
EMULATED = True
calls = _ops.calls

if device.enabled():
    device.install(npu)
    npu.default_generators = (device.GENERATOR,)


def _register_hccl():
    """The real torch_npu registers its HCCL process group on import.  Here "hccl" is gloo
    under that name, run on the npu tensors' CPU data (``hccl_p2p.install``: the collectives'
    tensors unwrapped), with HCCL's point-to-point rules on top (a send waits for its matching
    receive, posting order, tags ignored, batches run together)."""
    import torch.distributed as dist

    from . import hccl_p2p

    if dist.is_available() and "hccl" not in dist.Backend.backend_list:
        dist.Backend.register_backend(
            "hccl", lambda store, rank, size, timeout: dist.ProcessGroupGloo(store, rank, size, timeout),
            devices=["cpu"])
        hccl_p2p.install()


_register_hccl()

# as torch_npu's _init/core/_exports.py does: torch_npu.<op> is torch.ops.npu.<op>
npu_fused_infer_attention_score = torch.ops.npu.npu_fused_infer_attention_score
npu_fusion_attention = torch.ops.npu.npu_fusion_attention
npu_fusion_attention_grad = torch.ops.npu.npu_fusion_attention_grad
npu_rms_norm = torch.ops.npu.npu_rms_norm
npu_swiglu = torch.ops.npu.npu_swiglu
npu_rotary_mul = torch.ops.npu.npu_rotary_mul


def _report_at_exit(path: str) -> None:
    """``EMULATED_NPU_REPORT=FILE``: at exit, each process appends one JSON line, its rank, how
    often each emulated kernel ran, and the device allocator's peak bytes over the process's
    life (``peak_bytes``).  The kernels take npu tensors only, so a count above zero shows that
    work ran on the device (how a test sees it for a script it does not own, such as stock
    Megatron-LM's pretrain_gpt.py)."""
    import atexit
    import json

    def write():
        with open(path, "a") as f:
            f.write(json.dumps({"rank": int(_os.environ.get("RANK", "0")), "device": device.enabled(),
                                "calls": dict(calls), "peak_bytes": device.ALLOCATOR.peak}) + "\n")

    atexit.register(write)


if _os.environ.get("EMULATED_NPU_REPORT"):
    _report_at_exit(_os.environ["EMULATED_NPU_REPORT"])
