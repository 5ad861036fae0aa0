"""RMSNorm: ``torch_npu.npu_rms_norm`` on NPU, ``torch.nn.functional.rms_norm`` elsewhere
(one fused kernel in torch >= 2.4 on CUDA and CPU).  On the CPU with ``compile_ops``, an
autograd function whose forward and backward are each one compiled kernel
(``compiled.py``): eager CPU autograd takes the norm apart into ~10 passes.

Math: ``y = x * rsqrt(mean(x^2, -1) + eps) * weight``, computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _state
from . import compiled


def rms_norm_npu(x, weight, eps):
    import torch_npu

    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


def _rms_norm_math(x, weight, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype) * weight.to(x.dtype), rstd


def _rms_norm_grad_math(g, x, weight, rstd):
    xhat = x.float() * rstd
    gw = g.float() * weight.float()
    grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    grad_w = (g.float() * xhat).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


class _RMSNormCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = compiled.kernel(_rms_norm_math)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = compiled.kernel(_rms_norm_grad_math)(g, x, weight, rstd)
        return grad_x, grad_w, None


def rms_norm_torch(x, weight, eps):
    if compiled.on():
        return _RMSNormCompiled.apply(x, weight, eps)
    if x.dtype in (torch.float16, torch.bfloat16):
        y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
        return y * weight.to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm(x, weight, eps):
    if _state.backend() == "npu":
        return rms_norm_npu(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_reference(x, weight, eps):
    """The unfused formula, for tests."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for what megatron's ``WrappedTorchNorm`` builds (``torch.nn.RMSNorm``): same
    ``weight`` parameter and state-dict key, so checkpoints are interchangeable.  Under
    sequence parallelism the weight is marked so megatron all-reduces its gradient."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, backend={_state.backend()}"


def wrapped_torch_norm_new(original):
    """Wrap ``WrappedTorchNorm.__new__``: RMSNorm configs get the fused module; a LayerNorm
    under sequence parallelism, which stock refuses without Transformer Engine, gets torch's
    LayerNorm with its parameters marked as TE's norm marks them (megatron then all-reduces
    their gradients over the tensor-parallel group); the rest stock."""

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        unsupported = (config.layernorm_zero_centered_gamma or config.persist_layer_norm
                       or getattr(config, "memory_efficient_layer_norm", False))
        if config.normalization == "LayerNorm" and config.sequence_parallel and not unsupported:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
            for p in norm.parameters():
                setattr(p, "sequence_parallel", True)
            return norm
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            return original(cls, config, hidden_size, eps, persist_layer_norm,
                            zero_centered_gamma, normalization)
        return FusedRMSNorm(config, hidden_size, eps)

    return __new__
