"""Settings come from ``configure(...)`` and environment variables, never from ``sys.argv``.

Environment variables (read when ``ascend_patches`` is imported):

- ``ASCEND_PATCHES_DISABLE=rope,swiglu``: patch names or groups (``device``, ``ops``,
  ``collectives``) to leave alone.  An unknown name is an error.
- ``ASCEND_PATCHES_BACKEND=npu|cuda|cpu``: force a backend instead of detecting one.
- ``ASCEND_PATCHES_AUTO=0``: do not apply on import; call ``ascend_patches.apply()`` yourself.
- ``ASCEND_PATCHES_COMPILE_DECODE=1``: the ``decode_model`` patch runs its TP=1 decode step
  through ``torch.compile`` (CPU and CUDA).  Off by default: the first step of each batch
  size compiles for tens of seconds, which pays off only over long generations.
- ``ASCEND_PATCHES_ANSWER_CUDA_QUERIES=1``: a test mode for running Megatron-Core's own unit
  tests off CUDA.  ``torch.cuda.is_available()`` answers True and ``device_count()`` the
  number of local ranks (one device per process, as on a GPU node) to callers in ``megatron.*``
  and ``tests.*`` modules only, so their ``skipif(not torch.cuda.is_available())`` tests run
  on the CPU (or the emulated NPU), where the device layer serves their CUDA calls; torch
  itself (inductor, autograd, data loaders) keeps the true answers.  On an Ascend host
  torch_npu's ``transfer_to_npu`` answers the same questions for everyone.
- ``ASCEND_PATCHES_COMPILE_OPS=1``: on the CPU, the RMSNorm, SwiGLU and RoPE patches run
  their forward and backward as single-pass kernels that ``torch.compile`` (inductor's C++
  backend) generates, instead of several eager passes over memory each.  Off by default:
  the first call of each op compiles for seconds; it pays off over a training run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from typing import FrozenSet, Optional

BACKENDS = ("npu", "cuda", "cpu")


class ConfigurationError(ValueError):
    """A setting (environment variable or ``configure`` argument) that cannot be honoured;
    the message names it and what it may be."""


@dataclass(frozen=True)
class Settings:
    backend: str
    disabled: FrozenSet[str] = field(default_factory=frozenset)
    backend_reason: str = ""
    compile_decode: bool = False
    compile_ops: bool = False
    answer_cuda_queries: bool = False

    def with_(self, **kw) -> "Settings":
        return replace(self, **kw)


def parse_disable(value) -> FrozenSet[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = value.split(",")
    return frozenset(v.strip() for v in value if v and v.strip())


def env_backend() -> Optional[str]:
    value = os.environ.get("ASCEND_PATCHES_BACKEND", "").strip().lower()
    if value and value not in BACKENDS:
        raise ConfigurationError(f"ASCEND_PATCHES_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value or None


def env_disabled() -> FrozenSet[str]:
    return parse_disable(os.environ.get("ASCEND_PATCHES_DISABLE"))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_compile_ops(backend: str, on: bool) -> None:
    if on and backend != "cpu":
        raise ConfigurationError(f"compile_ops covers the CPU backend only (backend is {backend}): on NPU the ops are "
                         "torch_npu's fused kernels already, and the CUDA path is not built or measured")


def auto_apply() -> bool:
    return os.environ.get("ASCEND_PATCHES_AUTO", "1").strip() not in ("0", "false", "no")
