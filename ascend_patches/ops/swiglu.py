"""SwiGLU: ``y = silu(a) * b`` where ``x = [a | b]`` on the last dim (megatron's fused
linear_fc1 output is [gate | up] on each tensor-parallel rank, the layout npu_swiglu wants).

- NPU: ``torch_npu.npu_swiglu``.
- CUDA and CPU: one autograd function that keeps only views of its input (stock autograd
  also keeps silu(a)) and writes both gradient halves straight into one [gate | up]
  buffer, the gate half by aten's one-kernel ``silu_backward`` (``bench/bench_step.py``
  times it against stock).
- CPU with ``compile_ops``: the same function's forward and backward each run as one
  compiled kernel (``compiled.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _state
from . import compiled


def _swiglu_math(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def _swiglu_grad_math(g, x):
    """The compiled backward: one kernel writes both halves."""
    a, b = x.chunk(2, dim=-1)
    af, gf = a.float(), g.float()
    s = torch.sigmoid(af)
    grad_a = gf * b.float() * s * (1 + af * (1 - s))
    return torch.cat((grad_a.to(g.dtype), (gf * af * s).to(g.dtype)), dim=-1)


def _swiglu_grad_eager(g, x):
    a, b = x.chunk(2, dim=-1)
    grad = torch.empty(a.shape[:-1] + (2 * a.shape[-1],), dtype=g.dtype, device=g.device)
    grad_a, grad_b = grad.chunk(2, dim=-1)
    torch.mul(g, b, out=grad_b)  # scratch space for g*b, overwritten below
    torch.ops.aten.silu_backward.grad_input(grad_b, a, grad_input=grad_a)  # one kernel
    torch.mul(F.silu(a), g, out=grad_b)
    return grad


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # nothing beyond the input is kept
        return compiled.run(_swiglu_math)(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return compiled.kernel(_swiglu_grad_math)(g, x) if compiled.on() else _swiglu_grad_eager(g, x)


def swiglu_npu(x):
    import torch_npu

    return torch_npu.npu_swiglu(x, dim=-1)


def swiglu_torch(x):
    return _SwiGLU.apply(x)


def swiglu(x):
    if _state.backend() == "npu":
        return swiglu_npu(x)
    return swiglu_torch(x)


def swiglu_reference(x):
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


def _fusable(mlp, per_token_scale) -> bool:
    cfg = mlp.config
    newer = getattr  # fields megatron-core 0.14 does not have yet: absent means the feature is off
    return (
        cfg.gated_linear_unit
        and mlp.activation_func is F.silu
        and per_token_scale is None
        and not newer(cfg, "use_te_activation_func", False)
        and not cfg.activation_func_fp8_input_store
        and newer(cfg, "activation_func_clamp_value", None) is None
        and not newer(cfg, "glu_linear_offset", 0)
    )


def mlp_forward(original):
    """Wrap ``MLP.forward``: SwiGLU MLPs run fc1 -> fused swiglu -> fc2 whether or not
    ``bias_activation_fusion`` is set; other activations are not SwiGLU and run stock."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not _fusable(self, per_token_scale):
            return original(self, hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))

    return forward
