"""The NPU device layer: torch_npu's own ``transfer_to_npu`` plus the Megatron fixes it lacks.

``transfer_to_npu`` redirects ``torch.cuda.*``, ``device="cuda"`` arguments and the default
process-group backend to the NPU.  It does not know Megatron's private RNG helpers, which
reach into ``torch.cuda.default_generators``, nor Megatron's literal
``'torch.cuda.FloatTensor'`` type checks; those are patched here (see ``rng.py`` and
``cpu.tensor_type_wrapper``).
"""

from __future__ import annotations

import importlib


# What torch.cuda.get_device_capability answers on the NPU when the user has not said.
# transfer_to_npu makes Tensor.is_cuda the NPU's and get_device_capability torch_npu's, which
# is None unless TORCH_NPU_DEVICE_CAPABILITY is set; torch's own c10d broadcast (2.12+) then
# evaluates ``tensor.is_cuda and torch.cuda.get_device_capability(tensor.device)[0] >= 9`` and
# raises TypeError on every NPU tensor it broadcasts (a checkpoint save, a DDP parameter sync).
# "8.0" claims no Hopper feature (no FP8, no TMA); torch_npu documents the value as
# compatibility only.  A value the user exported wins.
DEFAULT_CAPABILITY = "8.0"


def activate_transfer_to_npu() -> str:
    """Import torch_npu's redirect (it acts on import and cannot be undone)."""
    import os

    capability = os.environ.setdefault("TORCH_NPU_DEVICE_CAPABILITY", DEFAULT_CAPABILITY)
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return ("torch_npu.contrib.transfer_to_npu imported (redirects torch.cuda to the NPU; not revertible); "
            f"TORCH_NPU_DEVICE_CAPABILITY={capability} (torch's broadcast needs a capability)")


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


def _eager(func):
    """A function as written: no decorator at all (``jit_fuser``'s replacement)."""
    return func


def eager_jit_fuser(original):
    """megatron's ``jit_fuser`` (``torch.compile`` on torch >= 2.2) as a no-op, and the megatron
    functions it already compiled (megatron imported first) back to the functions as written.

    torch.compile has no code generator for NPU tensors here (torch_npu's own inductor backend
    needs triton-ascend), and dynamo's tracing asks CUDA questions the wheel answers with None
    (``get_device_capability``), so Megatron-LM's first call of a fused function (its JIT warm-up)
    fails.  MindSpeed does the same (its adaptor replaces the JIT decorators).  What was compiled
    and what runs eagerly compute the same thing; only speed differs.  Reverting restores
    ``jit_fuser`` for later decorations, not the functions already unwrapped here."""
    import sys

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron."):
            continue
        if vars(module).get("jit_fuser") is original:  # `from megatron.core.jit import jit_fuser`, used later
            module.jit_fuser = _eager
        owners = [module] + [v for v in vars(module).values()
                             if isinstance(v, type) and v.__module__ == name]
        for owner in owners:
            for key, value in list(vars(owner).items()):
                plain = getattr(value, "_torchdynamo_orig_callable", None)
                if plain is not None:
                    setattr(owner, key, plain)
    return _eager
