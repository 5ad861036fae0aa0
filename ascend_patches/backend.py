"""Which accelerator this process drives: Ascend NPU if torch_npu imports, else CUDA, else CPU.

torch_npu needs Ascend's CANN libraries; where they are missing its import fails, and we
say so in the report instead of pretending an NPU is there.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional, Tuple

import torch

from .settings import BACKENDS, ConfigurationError

DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def torch_npu_module():
    """The imported torch_npu module, or None."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # CANN libraries missing: not an NPU machine
        return None


def detect(forced: Optional[str] = None) -> Tuple[str, str]:
    """Return (backend, reason)."""
    if forced:
        if forced not in BACKENDS:
            raise ConfigurationError(f"unsupported backend {forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "npu" and torch_npu_module() is None:
            raise ConfigurationError("backend 'npu' was asked for but torch_npu does not import (CANN missing?)")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError("backend 'cuda' was asked for but torch.cuda.is_available() is False")
        return forced, "forced by configuration"
    if torch_npu_module() is not None:
        return "npu", "torch_npu imported"
    if torch.cuda.is_available():
        return "cuda", f"torch.cuda.is_available() ({torch.cuda.device_count()} devices)"
    why = "no torch_npu"
    if importlib.util.find_spec("torch_npu") is not None:
        why = "torch_npu is installed but failed to import (CANN libraries missing?)"
    return "cpu", f"{why} and no CUDA device"


def dist_backend(backend: str) -> str:
    """The torch.distributed backend name for an accelerator backend."""
    return DIST_BACKEND[backend]


def device(backend: str) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    mod = torch.npu if backend == "npu" else torch.cuda  # torch.npu exists once torch_npu imports
    return torch.device(backend, mod.current_device())
