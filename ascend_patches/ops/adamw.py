"""Fused AdamW where Megatron builds its optimizer.

Megatron picks TE's or Apex's FusedAdam when installed, else a plain ``torch.optim.AdamW``
(one kernel per tensor per step).  We hand it, per backend:

- NPU: ``torch_npu.optim.NpuFusedAdamW``;
- CUDA and CPU: ``torch.optim.AdamW(fused=True)`` (torch has fused CPU AdamW since 2.4).

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
        if _state.backend() == "npu":
            import torch_npu

            if not adam_w_mode:
                raise NotImplementedError("torch_npu has no fused Adam with L2 decay here; "
                                          "use decoupled_weight_decay=True or disable the 'adamw' patch")
            return torch_npu.optim.NpuFusedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
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
