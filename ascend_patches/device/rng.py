"""Megatron's RNG tracker reads and writes ``torch.cuda.default_generators`` directly
(``_get_cuda_rng_state`` / ``_set_cuda_rng_state``).  On CPU the default CPU generator is
the one dropout draws from; on NPU it is torch_npu's generator: ``transfer_to_npu`` aliases
``torch.cuda.default_generators`` to it only from torch_npu 2.14 on, and then only once the
device is initialised."""

from __future__ import annotations

import torch


def get_state_cpu(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def set_state_cpu(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def get_state_npu(device="cuda", clone=False, graph_safe=False):
    import torch_npu

    return torch_npu.npu.get_rng_state()


def set_state_npu(new_state, device=-1, graph_safe=False):
    import torch_npu

    torch_npu.npu.set_rng_state(new_state)
