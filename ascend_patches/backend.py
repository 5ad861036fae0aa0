"""Which accelerator this process drives: Ascend NPU if torch_npu imports, else CUDA, else CPU.

torch_npu needs Ascend's CANN libraries.  Where torch_npu is installed but its import fails
(CANN's environment not sourced, a torch / torch_npu mismatch), that is an error naming the
import's failure, never a quiet fall back to the CPU: on an Ascend host a run would otherwise
train on the host's cores and look healthy.  ``ASCEND_PATCHES_BACKEND=cpu|cuda`` runs
without the NPU on purpose, and then torch_npu is not imported at all.
"""

import importlib
import importlib.util
import sys
from typing import Optional, Tuple

import torch

from .settings import BACKENDS, ConfigurationError

DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def torch_npu_module():
    """The imported torch_npu module, or None where it is not installed; an installed one that
    fails to import is a ConfigurationError saying why and what to do."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigurationError(
            f"torch_npu is installed but its import failed ({type(e).__name__}: {first}): source CANN's set_env.sh "
            "(in the Ascend toolkit's install folder) before running, or set ASCEND_PATCHES_BACKEND=cpu or "
            "ASCEND_PATCHES_BACKEND=cuda to run without the NPU on purpose") from e


def detect(forced: Optional[str] = None) -> Tuple[str, str]:
    """Return (backend, reason)."""
    if forced:
        if forced not in BACKENDS:
            raise ConfigurationError(f"unsupported backend {forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "npu" and torch_npu_module() is None:
            raise ConfigurationError("backend 'npu' was asked for but torch_npu is not installed: pip install -e '.[npu]' "
                                     "(torch_npu, with CANN on the host)")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError("backend 'cuda' was asked for but torch.cuda.is_available() is False")
        return forced, "forced by configuration"
    if torch_npu_module() is not None:
        return "npu", "torch_npu imported"
    if torch.cuda.is_available():
        return "cuda", f"torch.cuda.is_available() ({torch.cuda.device_count()} devices)"
    return "cpu", "no torch_npu and no CUDA device"


def dist_backend(backend: str) -> str:
    """The torch.distributed backend name for an accelerator backend."""
    return DIST_BACKEND[backend]


def device(backend: str) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "npu" and torch._C._get_privateuse1_backend_name() != "npu":
        if getattr(torch_npu_module(), "EMULATED", False):
            return torch.device("cpu")  # the test emulation's older mode (EMULATED_NPU_DEVICE=0): its NPU is the CPU
        raise ConfigurationError("torch_npu is imported but torch has no 'npu' device (PrivateUse1 was not renamed): "
                                 "check that torch and torch_npu are matching releases")
    mod = torch.npu if backend == "npu" else torch.cuda  # torch.npu exists once torch_npu imports
    return torch.device(backend, mod.current_device())


def device_memory(backend: str, which: str) -> Tuple[int, str]:
    """(bytes, where it came from): the device's ``"free"`` or ``"total"`` memory, asked of its
    own module (torch.npu, torch.cuda); on the CPU backend the host's available memory either way,
    which is what a CPU run can use."""
    if which not in ("free", "total"):
        raise ValueError(f"which must be 'free' or 'total', not {which!r}")
    if backend == "cpu":
        import psutil

        return psutil.virtual_memory().available, "the host's available memory (CPU backend)"
    mod = torch.npu if backend == "npu" else torch.cuda  # torch.npu exists once torch_npu imports
    if which == "free":
        return mod.mem_get_info()[0], f"the {backend} device's free memory"
    return mod.get_device_properties(mod.current_device()).total_memory, f"the {backend} device's total memory"
