"""``torch_npu.optim`` for the emulation."""

import torch


class NpuFusedAdamW(torch.optim.AdamW):
    """Emulated NPU fused AdamW: AdamW's update rule, one tensor at a time."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=False)
