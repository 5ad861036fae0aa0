"""Rotary position embedding, rotate-half convention (LLaMA / HF):
``y = x*cos + rotate_half(x)*sin`` with ``rotate_half(x) = cat(-x2, x1)``, on the first
``rot_dim`` channels; the rest pass through.

- NPU: ``torch_npu.npu_rotary_mul`` in the calling convention its registered schema has
  (read when the patch applies: releases differ, see ``rotary_call_for``).
- CUDA and CPU: an autograd function that saves only cos/sin (not x); cos/sin are computed
  once per ``freqs`` tensor (megatron passes the same one to every layer, for q and k)
  instead of twice per layer.
- CPU with ``compile_ops``: the same function's forward and backward each run as one
  compiled kernel (``compiled.py``).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .. import _state
from . import compiled
from ..registry import PatchNotApplicable, warn_once

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


def _rotary_three_tensors(x, cos, sin):
    import torch_npu

    return torch_npu.npu_rotary_mul(x, cos, sin)


def _rotary_mode_half(x, cos, sin):
    import torch_npu

    return torch_npu.npu_rotary_mul(x, cos, sin, rotary_mode="half")


def rotary_call_for(schema) -> Optional[Callable]:
    """The call that fits a registered ``npu_rotary_mul`` schema, or None.

    torch_npu has registered the op two ways: three tensors and nothing else (2.1.0.post8,
    rotate-half being its only mode), and with ``str rotary_mode='half'`` fourth (2.1.0.post17,
    2.5.1; 2.14.0 appends an optional ``rotate`` matrix).  Anything else is a
    convention this code has not seen, and guessing a keyword would fail on the first call.
    """
    args = list(schema.arguments)
    if len(args) < 3 or any(str(a.type) != "Tensor" for a in args[:3]):
        return None
    rest = args[3:]
    if any(not a.has_default_value() for a in rest):
        return None
    if not rest:
        return _rotary_three_tensors
    if rest[0].name == "rotary_mode" and str(rest[0].type) == "str" and not rest[0].kwarg_only:
        return _rotary_mode_half
    return None


def installed_rotary_schema():
    import torch_npu  # noqa: F401  (registers torch.ops.npu)

    return torch.ops.npu.npu_rotary_mul.default._schema


_npu_call = {"schema": None, "call": None}


def npu_rotary_call() -> Optional[Callable]:
    schema = installed_rotary_schema()  # the op's own schema object: the same one on every call
    if _npu_call["schema"] is not schema:
        _npu_call.update(schema=schema, call=rotary_call_for(schema))
    return _npu_call["call"]


def rotary_npu(x, cos, sin):
    call = npu_rotary_call()
    if call is None:
        raise RuntimeError(f"torch_npu's npu_rotary_mul has the schema {installed_rotary_schema()}, which fits no "
                           "calling convention ascend_patches knows; disable the 'rope' patch")
    return call(x, cos, sin)


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
    mscaled variants are not rotate-half and run stock code.  On an NPU whose
    ``npu_rotary_mul`` schema fits no known convention the patch does not apply (the report
    shows the schema) and megatron's own RoPE runs."""
    if _state.backend() == "npu" and npu_rotary_call() is None:
        raise PatchNotApplicable(f"torch_npu's npu_rotary_mul schema fits no known calling convention: "
                                 f"{installed_rotary_schema()}")

    # its options after (t, freqs): 0.16 multi_latent_attention=False; 0.17+ mla_rotary_interleaved
    # and a deprecated multi_latent_attention=None; every one off/None by default, mscale 1.0
    names = list(inspect.signature(original).parameters)[2:]
    known = frozenset(names)

    def _apply_rotary_pos_emb_bshd(t, freqs, *args, **kwargs):
        options = dict(zip(names, args), **kwargs)
        if (len(args) > len(names) or not known.issuperset(kwargs) or t.dim() != 4
                or options.get("mscale", 1.0) != 1.0 or any(v for k, v in options.items() if k != "mscale")):
            warn_once("ascend_patches RoPE covers rotate-half 4-D inputs only; running stock RoPE "
                      f"({', '.join(f'{k}={v}' for k, v in options.items())}, dim={t.dim()})")
            return original(t, freqs, *args, **kwargs)
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


def thd_positions(cu_seqlens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """Each token's position inside its own sequence, for a pack whose sequences end at
    cu_seqlens[1:] (this rank's share of each under context parallelism: megatron's
    load-balanced halves i and 2*cp-1-i)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = []
    for n in lengths:
        if cp_size == 1:
            parts.append(torch.arange(n))
            continue
        full, half = n, n // (2 * cp_size)
        if n % (2 * cp_size):
            raise ValueError(f"RoPE on a packed batch under context parallelism: a sequence of {n} tokens does "
                             f"not split into 2 x {cp_size} equal chunks; pad each to a multiple of {2 * cp_size}")
        parts += [torch.arange(cp_rank * half, (cp_rank + 1) * half),
                  torch.arange(full - (cp_rank + 1) * half, full - cp_rank * half)]
    return torch.cat(parts).to(cu_seqlens.device)


_thd_cache = {"key": None, "freqs": None}


def apply_rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int = 1,
                   cp_rank: int = 0) -> torch.Tensor:
    """t: [t, n, d], sequences back to back; freqs: [max_s, 1, 1, rot]. Positions restart at
    each sequence; the whole pack is one fused RoPE call.  The gathered freqs are kept while
    megatron passes the same freqs and cu_seqlens (every layer, q and k), so the cos/sin cache
    holds too."""
    key = (id(freqs), freqs._version, id(cu_seqlens), cu_seqlens._version, cp_size, cp_rank)
    c = _thd_cache
    if c["key"] != key or freqs.is_inference():
        local = (cu_seqlens // cp_size) if cp_size > 1 else cu_seqlens
        if int(local[-1]) != t.shape[0]:
            raise ValueError(f"RoPE on a packed batch: cu_seqlens ends at {int(cu_seqlens[-1])} tokens "
                             f"(/{cp_size} ranks) but the pack holds {t.shape[0]}")
        pos = thd_positions(cu_seqlens, cp_size, cp_rank)
        if int(pos.max()) >= freqs.shape[0]:
            raise ValueError(f"RoPE on a packed batch: a sequence is longer than the {freqs.shape[0]} positions "
                             "the rotary table holds (max_seqlen in PackedSeqParams)")
        c.update(key=key, freqs=freqs[pos.to(freqs.device)], refs=(freqs, cu_seqlens))
    return apply_rope(t.unsqueeze(1), c["freqs"]).squeeze(1)


def fused_rope_thd_slot(original):
    """megatron's ``fused_apply_rotary_pos_emb_thd`` slot (Transformer Engine's kernel when TE
    is installed; stock asserts it with ``apply_rope_fusion`` on a packed batch): where it is
    empty, ``apply_rope_thd`` fills it."""
    if original is not None:
        return original

    def fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=1, cp_rank=0, interleaved=False):
        if interleaved:  # 0.19 passes config.rotary_interleaved
            raise ValueError("ascend_patches' packed (THD) RoPE is rotate-half only: interleaved RoPE "
                             "(--rotary-interleaved) on packed sequences is not covered; set apply_rope_fusion off")
        return apply_rope_thd(t, cu_seqlens, freqs, cp_size, cp_rank)

    return fused_apply_rotary_pos_emb_thd
