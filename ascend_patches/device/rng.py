"""Megatron's RNG tracker reads and writes ``torch.cuda.default_generators`` directly
(``_get_cuda_rng_state`` / ``_set_cuda_rng_state``).  On CPU the default CPU generator is
the one dropout draws from; on NPU it is torch_npu's generator."""

from __future__ import annotations

import torch


def _npu():
    import torch_npu

    return torch_npu.npu


def get_state_cpu(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def set_state_cpu(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def get_state_npu(device="cuda", clone=False, graph_safe=False):
    return _npu().get_rng_state()


def set_state_npu(new_state, device=-1, graph_safe=False):
    _npu().set_rng_state(new_state)
