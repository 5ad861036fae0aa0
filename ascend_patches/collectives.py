"""Collectives that gloo lacks or restricts, so Megatron's distributed optimizer, sequence
parallelism and tensor-parallel utilities run over CPU processes.

gloo's all-gather into one tensor insists that the output be the inputs concatenated on
dim 0 (shape [world * d0, ...]); NCCL and HCCL take any output with the right number of
elements, and megatron passes flat 1-D outputs (``gather_split_1d_tensor``, the timers).
The wrapper views such an output in the shape gloo wants - the same memory, so the result
lands exactly where the caller expects it.

gloo has all-reduce and all-gather but no reduce-scatter.  Reduce-scatter is emulated as
an all-reduce into a scratch copy followed by taking this rank's slice: the result is
the same sum, at world-size times the traffic, which is fine for CPU tests and demos.
Groups on other backends go straight to the original function.

Megatron issues its reduce-scatters inside ``_coalescing_manager``, where torch only
queues a collective; the emulation talks to the process group directly so its result is
there when the slice is taken.
"""

from __future__ import annotations

import torch.distributed as dist


class _DoneWork:
    """What an ``async_op=True`` collective returns once it has already completed."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _reduce_scatter_via_all_reduce(output, input, op, group):
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if input.shape[0] != world * output.shape[0]:
        raise ValueError(
            f"reduce_scatter: input dim 0 ({input.shape[0]}) must be world size ({world}) "
            f"x output dim 0 ({output.shape[0]})"
        )
    scratch = input.detach().clone()
    average = op == dist.ReduceOp.AVG  # gloo has no AVG: sum, then divide
    # Straight to the process group: inside megatron's `_coalescing_manager` a
    # dist.all_reduce would only be queued, and we must read its result right away.
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM if average else op
    pg.allreduce([scratch], opts).wait()
    if average:
        scratch.div_(world)
    output.copy_(scratch.chunk(world, dim=0)[rank])


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def reduce_scatter_wrapper(original):
    """``reduce_scatter_tensor`` and the older ``_reduce_scatter_base`` share one signature."""

    def reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_gloo(group):
            return original(output, input, op=op, group=group, async_op=async_op)
        _reduce_scatter_via_all_reduce(output, input, op, group)
        return _DoneWork() if async_op else None

    reduce_scatter.__wrapped__ = original
    reduce_scatter.__name__ = original.__name__
    return reduce_scatter


def all_gather_into_tensor_wrapper(original):
    """``all_gather_into_tensor`` and the older ``_all_gather_base`` share one signature."""

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if output_tensor.dim() != max(1, input_tensor.dim()) and output_tensor.is_contiguous() and _is_gloo(group):
            world = dist.get_world_size(group)
            if output_tensor.numel() == world * input_tensor.numel():
                rows = world * (input_tensor.shape[0] if input_tensor.dim() else 1)
                output_tensor = output_tensor.view(rows, *input_tensor.shape[1:])
        return original(output_tensor, input_tensor, group=group, async_op=async_op)

    all_gather_into_tensor.__wrapped__ = original
    all_gather_into_tensor.__name__ = original.__name__
    return all_gather_into_tensor


def backend_name_wrapper(original, accelerator_backend: str):
    """``init_process_group(backend='nccl')`` as Megatron-LM scripts write it, on a machine
    whose accelerator needs another backend."""

    def with_backend(*args, **kwargs):
        if kwargs.get("backend") == "nccl":
            kwargs["backend"] = accelerator_backend
        elif args and isinstance(args[0], str) and args[0] == "nccl" and original.__name__ == "init_process_group":
            args = (accelerator_backend,) + args[1:]
        return original(*args, **kwargs)

    with_backend.__wrapped__ = original
    with_backend.__name__ = original.__name__
    return with_backend
