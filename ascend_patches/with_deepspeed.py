"""What Megatron-Core modules need to train under DeepSpeed, none of it forked.

- ``mpu``: DeepSpeed asks its ``mpu`` argument for ``get_model_parallel_rank/world_size/
  group`` (ZeRO's partitioning, gradient clipping, checkpoint names); Megatron-Core's
  ``parallel_state`` names the same groups "tensor model parallel".  ``MegatronMPU`` answers
  DeepSpeed's questions from ``parallel_state``.
- RNG and recompute: with DeepSpeed's activation checkpointing configured, a recomputed
  forward must draw the dropout masks the first forward drew.  ``deepspeed.checkpointing``
  saves and restores its own RNG tracker around a recompute, so megatron's
  ``get_cuda_rng_tracker``, ``model_parallel_cuda_manual_seed``,
  ``model_parallel_reconfigure_tp_seed`` and ``checkpoint`` route to DeepSpeed's while it is
  configured (as Megatron-DeepSpeed does); otherwise they are megatron's own.
- fp16 on an Ascend NPU in saturation mode (Atlas 910A; A2/A3 default to INF_NAN):
  overflow shows as saturated values, not inf/nan, so DeepSpeed's dynamic loss scaler never
  sees an overflow.  Such a run is refused with the reason.

Everything else Ascend's old ``deepspeed_npu`` adaptor patched is DeepSpeed's own now (its
NPU accelerator is picked when torch_npu imports, its FusedAdam, builders, launcher and
timers), so nothing of it is re-patched; ``ascend_patches.report()`` names the accelerator.
"""

from __future__ import annotations

import sys


def _ds_checkpointing():
    """deepspeed.checkpointing while it is configured, else None."""
    ds = sys.modules.get("deepspeed")
    if ds is None:
        return None
    from deepspeed import checkpointing

    return checkpointing if checkpointing.is_configured() else None


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state``."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()


mpu = MegatronMPU()


def routed(name: str):
    """A wrapper for one of megatron's RNG / recompute functions: DeepSpeed's namesake while
    ``deepspeed.checkpointing`` is configured, megatron's own otherwise."""

    def wrapper(original):
        def function(*args, **kwargs):
            ds = _ds_checkpointing()
            if ds is None:
                return original(*args, **kwargs)
            if name == "checkpoint":  # megatron: (function, distribute_saved_activations, *args)
                fn, _distribute, *rest = args
                return _checkpoint(ds, fn, rest)
            if name == "get_cuda_rng_tracker":  # megatron's takes TE / inference / graph flags
                return ds.get_cuda_rng_tracker()
            return getattr(ds, name)(*args[:1], **{k: v for k, v in kwargs.items() if k == "seed"})

        function.__wrapped__ = original
        function.__name__ = original.__name__
        return function

    return wrapper


def _checkpoint(ds, fn, args):
    """``deepspeed.checkpointing.checkpoint`` over the arguments that are activations (tensors
    that require grad); the others (RoPE's frequency table, masks, non-tensors) reach the
    layer through a closure.  With ``partition_activations`` DeepSpeed splits every
    floating-point tensor argument across TP ranks, and a RoPE table split so arrives
    0-dimensional in the layer; only activations are DeepSpeed's to partition."""
    import torch

    grads = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]

    def run(*activations):
        full = list(args)
        for i, a in zip(grads, activations):
            full[i] = a
        return fn(*full)

    return ds.checkpoint(run, *[args[i] for i in grads])


def npu_saturation_check(original):
    """Refuse DeepSpeed's fp16 loss scaling on an NPU in saturation mode (see module doc)."""

    def __init__(self, *args, **kwargs):
        import torch_npu

        if not torch_npu.npu.utils.is_support_inf_nan():
            raise RuntimeError(
                "fp16 with DeepSpeed's dynamic loss scaling needs inf/nan overflow detection, but this NPU runs in "
                "saturation mode (torch_npu.npu.utils.is_support_inf_nan() is False, as on Atlas 910A): overflows "
                "would go unseen. Train in bf16, or on an NPU that supports INF_NAN mode")
        return original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    return __init__


def accelerator_note() -> str:
    """Which DeepSpeed accelerator was chosen, once deepspeed is imported ('' before)."""
    if "deepspeed" not in sys.modules:
        return ""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return f"DeepSpeed accelerator: {acc.device_name()} ({type(acc).__name__}), communication backend " \
           f"{acc.communication_backend_name()}"
