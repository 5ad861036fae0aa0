"""Process groups for the recipes: torch.distributed on the accelerator's backend, then
megatron's model-parallel groups.  Works under torchrun and as a single plain process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import ascend_patches

from recipes.errors import BadInput


_owns_process_group = False  # destroy() leaves a caller's process group alone (recipes.demo chains recipes)


def default_rendezvous_env() -> None:
    """What torchrun would set, for a command started as one plain process."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)


def init_distributed(tp: int = 1, pp: int = 1, vpp=None, seed: int = 1234, timeout_s: int = 600, cp: int = 1):
    """Initialise torch.distributed (if needed) and megatron's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    global _owns_process_group
    if not dist.is_initialized():
        _owns_process_group = True
        default_rendezvous_env()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if ascend_patches.settings().backend != "cpu":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            mod = torch.npu if ascend_patches.settings().backend == "npu" else torch.cuda
            mod.set_device(local)
        dist.init_process_group(backend=ascend_patches.dist_backend(), world_size=world, rank=rank,
                                timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise BadInput(f"world size {world} is not divisible by tensor ({tp}) x pipeline ({pp}) x context ({cp}) "
                       "parallel size")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy():
    from megatron.core import parallel_state

    global _owns_process_group
    parallel_state.destroy_model_parallel()
    if dist.is_initialized() and _owns_process_group:
        dist.destroy_process_group()
        _owns_process_group = False
