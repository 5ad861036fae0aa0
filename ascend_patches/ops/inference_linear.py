"""Tensor-parallel linear layers without autograd machinery when no gradient is wanted.

Megatron routes every ColumnParallel/RowParallelLinear matmul, and every TP region entry and
exit, through a ``torch.autograd.Function`` so the backward can overlap communication.  At
generation and evaluation time (``torch.no_grad``) that costs a Function.apply per call and
buys nothing; on small models it is most of a decode step.  Under no_grad these call the
same forward math directly: one matmul (plus the sequence-parallel all-gather when that is
on, which is left to stock code), and the region's forward collective.
"""

from __future__ import annotations

import functools

import torch

from . import packed_linear


def linear_wrapper(original):
    @functools.wraps(original)  # megatron keeps a 'warned' flag on the function object
    def linear_with_grad_accumulation_and_async_allreduce(input, weight, bias, gradient_accumulation_fusion,
                                                          allreduce_dgrad, sequence_parallel, *args, **kwargs):
        if torch.is_grad_enabled() or sequence_parallel:
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                            sequence_parallel, *args, **kwargs)
        return packed_linear.linear(input, weight, bias)  # F.linear unless the weight was packed (CPU)

    return linear_with_grad_accumulation_and_async_allreduce


def region_wrapper(forward_fn_name: str):
    """``copy_to`` / ``reduce_from`` / ``gather_from`` TP region: call the forward collective
    (``mappings._reduce`` ...) directly under no_grad."""

    def make(original):
        @functools.wraps(original)
        def region(input_, *args, **kwargs):
            if torch.is_grad_enabled():
                return original(input_, *args, **kwargs)
            from megatron.core.tensor_parallel import mappings

            group = kwargs.get("group", args[0] if args else None)
            group = mappings.get_tensor_model_parallel_group_if_none(group)
            if forward_fn_name == "identity":
                return input_
            return getattr(mappings, forward_fn_name)(input_, group)

        return region

    return make
