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
