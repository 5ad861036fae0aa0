"""Fused AdamW where Megatron builds its optimizer.

Megatron picks TE's or Apex's FusedAdam when installed, else a plain ``torch.optim.AdamW``
(one kernel per tensor per step).  We hand it ``torch.optim.AdamW(fused=True)`` (``Adam``
for L2 decay) on every backend: torch's fused path calls ``torch._fused_adamw_`` /
``_fused_adam_``, which dispatch by device to CUDA's kernel, the CPU's (torch >= 2.4), and on
an NPU to the kernel torch-npu registers (2.14.0's ``libtorch_npu.so`` holds
``wrapper_NPU___fused_adamw_`` and ``wrapper_NPU___fused_adam_``; torch lists the
PrivateUse1 backend among its fused-kernel devices).  It takes per-tensor lists, so
megatron's ``main_grad`` views into one DDP bucket stay views, and keeps ``state['step']`` as
a tensor, which the distributed optimizer reads at save.

Not ``torch_npu.optim.NpuFusedAdamW``: on its first step it sizes each parameter and
gradient by its *storage* (``p.grad.storage().size()``) and copies them into one combined
tensor; a ``main_grad`` view reports the whole bucket as its storage, so the combined size is
N x the bucket, or the bucket is moved out from under DDP (its
``optim/npu_fused_optim_base.py``).  MindSpeed calls ``npu_apply_adam_w`` per tensor instead.

Megatron calls the class the Apex way (``adam_w_mode=`` selects AdamW vs Adam+L2), and with
``lr=None`` where its ``OptimizerConfig.lr`` is unset: its scheduler sets each group's rate
before the first step.  Apex's and TE's FusedAdam take that; torch's optimizers refuse it in
the constructor, so the groups are built with a rate of 0 and then given ``None`` back, and a
step taken before every group has a rate is refused (before it touches any state), instead
of silently not moving.
"""

from __future__ import annotations

import torch

from .. import _state


class FusedAdamW:
    """A factory with Apex FusedAdam's signature that returns the backend's fused optimizer."""

    def __new__(cls, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                adam_w_mode=True, capturable=False, **unsupported):
        if unsupported:
            raise TypeError(f"ascend_patches FusedAdamW does not support {sorted(unsupported)}; "
                            "disable the 'adamw' patch to use megatron's own choice")
        if capturable and _state.backend() != "cuda":  # megatron-core 0.17+ passes optimizer_cuda_graph
            raise NotImplementedError(f"a CUDA-graph-capturable optimizer (optimizer_cuda_graph) on the "
                                      f"{_state.backend()} backend: there are no CUDA graphs here; turn it off")
        opt = cls._build(params, 0.0 if lr is None else lr, betas, eps, weight_decay, adam_w_mode, capturable)
        if lr is None:
            opt.defaults["lr"] = None
            for group in opt.param_groups:
                group["lr"] = None
            opt.register_step_pre_hook(_refuse_unset_lr)
        return opt

    @staticmethod
    def _build(params, lr, betas, eps, weight_decay, adam_w_mode, capturable):
        opt_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
        if capturable:
            return opt_cls(params, fused=True, capturable=True, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return opt_cls(params, fused=True, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _refuse_unset_lr(optimizer, args, kwargs):
    unset = [i for i, group in enumerate(optimizer.param_groups) if group["lr"] is None]
    if unset:
        raise ValueError(f"optimizer step with no learning rate in param group(s) {unset}: the optimizer was built "
                         "with lr=None (megatron's OptimizerConfig.lr unset) and nothing set one since; give "
                         "OptimizerConfig.lr or let megatron's OptimizerParamScheduler step first")
