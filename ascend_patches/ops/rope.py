"""Rotary position embedding, rotate-half convention (LLaMA / HF):
``y = x*cos + rotate_half(x)*sin`` with ``rotate_half(x) = cat(-x2, x1)``, on the first
``rot_dim`` channels; the rest pass through.

- NPU: ``torch_npu.npu_rotary_mul(x, cos, sin, mode='half')``.
- CUDA and CPU: an autograd function that saves only cos/sin (not x); cos/sin are computed
  once per ``freqs`` tensor (megatron passes the same one to every layer, for q and k)
  instead of twice per layer.
- CPU with ``compile_ops``: the same function's forward and backward each run as one
  compiled kernel (``compiled.py``).
"""

from __future__ import annotations

import torch

from .. import _state
from . import compiled
from ..registry import warn_once

_cache = {"freqs": None, "version": None, "dtype": None, "cos": None, "sin": None}


def cos_sin(freqs: torch.Tensor, dtype: torch.dtype):
    if freqs.is_inference():  # no version counter to tell an in-place change: computed every call
        return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    c = _cache
    if c["freqs"] is freqs and c["version"] == freqs._version and c["dtype"] == dtype:
        return c["cos"], c["sin"]
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    c.update(freqs=freqs, version=freqs._version, dtype=dtype, cos=cos, sin=sin)
    return cos, sin


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_transposed(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def _rope_math(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rope_grad_math(g, cos, sin):
    return g * cos + _rotate_half_transposed(g * sin)


class _RotaryHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return compiled.run(_rope_math)(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return compiled.run(_rope_grad_math)(g, cos, sin), None, None


def rotary_npu(x, cos, sin):
    import torch_npu

    return torch_npu.npu_rotary_mul(x, cos, sin, mode="half")


def rotary_torch(x, cos, sin):
    return _RotaryHalf.apply(x, cos, sin)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t: [s, b, n, d] (or any 4-D layout freqs broadcasts against); freqs: [s, 1, 1, rot]."""
    rot = freqs.shape[-1]
    cos, sin = cos_sin(freqs, t.dtype)
    x, rest = (t, None) if rot == t.shape[-1] else (t[..., :rot], t[..., rot:])
    y = rotary_npu(x, cos, sin) if _state.backend() == "npu" else rotary_torch(x, cos, sin)
    return y if rest is None else torch.cat((y, rest), dim=-1)


def rope_reference(t, freqs):
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    y = x * torch.cos(freqs).to(t.dtype) + _rotate_half(x) * torch.sin(freqs).to(t.dtype)
    return torch.cat((y, rest), dim=-1)


def apply_rotary_pos_emb_bshd(original):
    """Wrap megatron's ``_apply_rotary_pos_emb_bshd``; interleaved, MLA-permuted and
    mscaled variants are not rotate-half and run stock code."""

    def _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or mscale != 1.0 or t.dim() != 4:
            warn_once("ascend_patches RoPE covers rotate-half 4-D inputs only; running stock RoPE "
                      f"(interleaved={rotary_interleaved}, mla={multi_latent_attention}, mscale={mscale}, dim={t.dim()})")
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        return apply_rope(t, freqs)

    return _apply_rotary_pos_emb_bshd


def fused_rope_slot(original):
    """megatron's ``apply_rope_fusion`` slot (``fused_apply_rotary_pos_emb``, Transformer
    Engine's kernel when TE is installed): where it is empty, this op fills it, so Megatron-LM's
    default ``--rope-fusion`` runs without TE.  Interleaved RoPE takes megatron's own code."""
    if original is not None:
        return original

    def fused_apply_rotary_pos_emb(t, freqs, interleaved=False):
        from megatron.core.models.common.embeddings import rope_utils

        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)

    return fused_apply_rotary_pos_emb
