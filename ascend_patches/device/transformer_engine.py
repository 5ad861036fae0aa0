"""Megatron-Core without Transformer Engine (every CPU and NPU machine, and GPUs without it).

``megatron.core.utils.is_te_min_version`` compares ``get_te_version()`` with the version
asked; without TE that is None and the comparison raises TypeError, so any caller not
guarded by ``HAVE_TE`` (Megatron-Core's own test fixtures, for one) fails.  Where TE is not
installed no minimum version of it is met: the answer is False.
"""

from __future__ import annotations


def is_te_min_version_wrapper(original):
    def is_te_min_version(version, check_equality=True):
        from megatron.core import utils

        if utils.get_te_version() is None:
            return False
        return original(version, check_equality)

    is_te_min_version.__wrapped__ = original
    return is_te_min_version


def checkpoint_without_output_init_wrapper(original):
    """``tensor_parallel.CheckpointWithoutOutput(fp8=False)`` (how megatron-core's TransformerLayer
    builds the checkpoint of ``--recompute-modules layernorm``) sets ``self.fp8 = fp8 is not None``,
    True for False; its forward then calls TE's ``FP8GlobalStateManager``, which is not imported
    without TE (NameError, megatron-core 0.16 to 0.19).  False and None mean no FP8."""
    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = fp8 is not None and fp8 is not False

    __init__.__wrapped__ = original
    return __init__


class _OffloadFlag:
    """The one thing megatron-core's fine-grained activation offloading asks of TE's
    ``cpu_offload`` module: a ``CPUOffloadEnabled`` switch, which TE's layers read to keep their
    weights out of the offload.  Without TE there are no such layers: the weights' turn is
    ``parameters_not_offloaded`` below."""

    CPUOffloadEnabled = False


def te_cpu_offload_flag(original):
    """``megatron.core.extensions.transformer_engine.cpu_offload``: None without TE, and then
    ``PipelineOffloadManager.__enter__`` raises "TE CPU offload is not available" even for the
    local (non-TE) layers.  Where TE's module is there it is kept."""
    from .. import registry

    if original is not None:
        raise registry.PatchNotApplicable("Transformer Engine's cpu_offload is installed")
    return _OffloadFlag


def parameters_not_offloaded(original):
    """``ChunkOffloadHandler.tensor_need_offloading_checker``: megatron's non-TE linear layers save
    their weight for the backward, and the offload hook would copy it to the host and back each
    micro-batch (the weight stays on the device anyway; nothing is saved).  TE marks its weights
    ``offloading_activation = False``; here a parameter is never offloaded."""
    import torch

    def tensor_need_offloading_checker(self, tensor):
        if isinstance(tensor, torch.nn.Parameter):
            return False
        return original(self, tensor)

    tensor_need_offloading_checker.__wrapped__ = original
    return tensor_need_offloading_checker
