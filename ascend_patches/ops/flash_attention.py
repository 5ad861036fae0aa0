"""Flash attention for megatron's ``DotProductAttention`` (the local spec's core attention).

- NPU: ``torch_npu.npu_fusion_attention`` in the "SBH" layout megatron already holds
  ([s, b, heads*d]), causal via the compressed 2048x2048 mask with ``sparse_mode=2``,
  GQA with k/v at their own head count (no repeat).
- CUDA and CPU: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-
  efficient kernels), ``enable_gqa`` so k/v are not materialised per query head.
- CPU, fp32 causal self-attention in eager mode, 256 to 1023 tokens, heads of 32+ wide:
  ``attention_blocked``, the causal triangle in query blocks of ``BLOCK_ROWS`` rows, each
  against its prefix of keys.

Packed (THD) batches, megatron's ``PackedSeqParams(qkv_format="thd")``: q [t, n, d] and k, v
[t, ng, d] hold sequences back to back, ``cu_seqlens`` their cumulative ends; each sequence
attends causally to itself alone (``attention_thd``):

- NPU: ``npu_fusion_attention`` in "TND" layout with ``actual_seq_qlen`` / ``actual_seq_kvlen``
  as the wheel documents them (prefix sums: lengths 2 2 2 are passed as 2 4 6), causal per
  sequence via the compressed 2048x2048 mask with ``sparse_mode=3``.
- CUDA: flash-attn's ``flash_attn_varlen_func`` where it is installed (fp16 / bf16), else
  SDPA per sequence.
- CPU: SDPA per sequence, causal, forward and backward; no t x t mask is ever built.

Megatron's masks are boolean with True = masked out (NPU agrees; SDPA wants the opposite).
Stock fills masked scores with -10000 rather than -inf; the two agree whenever a row keeps
at least one position, which causal and padding masks always do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _state
from . import context_parallel
from .npu_masks import compressed_causal_mask
from ..registry import warn_once

_CACHE_LINE = 64  # bytes, x86 and Arm server cores


def _full_mask(mask: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """npu_fusion_attention rejects [B,1,1,S] padding masks: broadcast them to [B,1,Sq,Sk]."""
    if mask.dim() == 4 and (mask.shape[2] != sq or mask.shape[3] != sk):
        mask = mask.expand(mask.shape[0], mask.shape[1], sq, sk)
    return mask.bool()


def attention_npu(q, k, v, causal: bool, mask: Optional[torch.Tensor], scale: float, dropout_p: float):
    import torch_npu

    sq, b, n, d = q.shape
    sk, _, ng, dv = v.shape
    if causal:  # left-up causal from the compressed mask (torch_npu's sparse_mode 2)
        atten_mask, sparse_mode, pre_tockens, next_tockens = compressed_causal_mask(q.device), 2, 65536, 0
    else:
        atten_mask = None if mask is None else _full_mask(mask, sq, sk)
        sparse_mode, pre_tockens, next_tockens = 0, 2147483647, 2147483647  # the schema's defaults
    out = torch_npu.npu_fusion_attention(
        q.reshape(sq, b, n * d), k.reshape(sk, b, ng * d), v.reshape(sk, b, ng * dv), n, "SBH",
        atten_mask=atten_mask, scale=scale, keep_prob=1.0 - dropout_p, pre_tockens=pre_tockens,
        next_tockens=next_tockens, sparse_mode=sparse_mode,
    )[0]
    return out


def attention_sdpa(q, k, v, causal: bool, mask: Optional[torch.Tensor], scale: float, dropout_p: float,
                   gqa: Optional[bool] = None):
    sq, b, n, d = q.shape
    gqa = k.shape[2] != n if gqa is None else gqa
    if v.device.type == "cpu" and v.shape[-1] * v.element_size() < _CACHE_LINE and not v.is_contiguous():
        # v is a view into the fused QKV projection: with heads narrower than a cache line,
        # the CPU kernel's reads of V rows each touch a line of their own
        v = v.contiguous()
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d], views
    attn_mask = None if mask is None else ~mask.bool()
    out = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal and mask is None,
        scale=scale, enable_gqa=gqa,
    )
    return out.permute(2, 0, 1, 3).reshape(sq, b, n * v.shape[3])


BLOCK_ROWS = 64  # query rows per block: GEMMs of 64 rows still run near the CPU's GEMM rate,
# and the masked half of each diagonal block adds only 64 / s to the triangle's work


def _block_probs(qs, k, i0, e, future):
    """softmax of query rows i0:e against keys 0:e, the diagonal block's future masked."""
    scores = torch.bmm(qs[:, i0:e], k[:, :e].mT)
    scores[:, :, i0:e].masked_fill_(future[:e - i0, :e - i0], float("-inf"))
    return torch.softmax(scores, -1)


class _BlockedCausal(torch.autograd.Function):
    """Causal attention as batched GEMMs over query blocks, [bn, s, d] in and out.

    At the lengths ``blocked_applies`` admits, torch's CPU flash kernel runs far below the
    CPU's GEMM rate; here each block of rows is one ``bmm`` against its whole key prefix,
    so most of the work runs as large GEMMs and keys past the block are never touched.
    Like flash attention it saves only q, k, v: the backward recomputes each block's
    probabilities (one more GEMM per block) instead of holding the s x s/2 triangle."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        s = q.shape[1]
        qs = q * scale
        future = torch.ones(BLOCK_ROWS, BLOCK_ROWS, dtype=torch.bool, device=q.device).triu(1)
        blocks = []
        for i0 in range(0, s, BLOCK_ROWS):
            e = min(i0 + BLOCK_ROWS, s)
            blocks.append(torch.bmm(_block_probs(qs, k, i0, e, future), v[:, :e]))
        out = torch.cat(blocks, 1)
        ctx.save_for_backward(qs, k, v, future)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, k, v, future = ctx.saved_tensors
        s = qs.shape[1]
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        for i0 in range(0, s, BLOCK_ROWS):
            e = min(i0 + BLOCK_ROWS, s)
            probs, do = _block_probs(qs, k, i0, e, future), dout[:, i0:e]
            dv[:, :e] += torch.bmm(probs.mT, do)
            dscores = torch._softmax_backward_data(torch.bmm(do, v[:, :e].mT), probs, -1, probs.dtype)
            dq[:, i0:e] = torch.bmm(dscores, k[:, :e])
            dk[:, :e] += torch.bmm(dscores.mT, qs[:, i0:e])
        return dq.mul_(ctx.scale), dk, dv, None


def attention_blocked(q, k, v, scale: float):
    """q: [s, b, n, d]; k, v: [s, b, ng, d]; causal, no dropout. Returns [s, b, n*d]."""
    s, b, n, d = q.shape
    ng = k.shape[2]

    def heads_first(t):  # [s, b, ng, d] -> [b*n, s, d], each k/v head repeated for its query heads
        t = t.permute(1, 2, 0, 3)
        if ng != n:
            t = t.unsqueeze(2).expand(b, ng, n // ng, s, t.shape[-1])
        return t.reshape(b * n, s, t.shape[-1])

    q2 = q.permute(1, 2, 0, 3).reshape(b * n, s, d)
    out = _BlockedCausal.apply(q2, heads_first(k), heads_first(v), scale)
    return out.view(b, n, s, -1).permute(2, 0, 1, 3).reshape(s, b, -1)


# Where bench/bench_attention_cpu.py finds the blocked path ahead of torch's CPU flash
# kernel.  The fused kernel is as fast or faster below 256 rows (a triangle of a few
# blocks), from 1024 rows on, for heads narrower than 32 (the score GEMM's inner
# dimension), and when batch x heads x head width is under 1024 (too few, too thin
# batched GEMMs to amortise the per-block calls).
BLOCKED_MIN_SEQ = 256
BLOCKED_MAX_SEQ = 1024
BLOCKED_MIN_HEAD_DIM = 32
BLOCKED_MIN_WIDTH = 1024


def blocked_applies(q, k, causal, mask, dropout_p) -> bool:
    s, b, n, d = q.shape
    return (causal and mask is None and dropout_p == 0.0 and q.device.type == "cpu" and q.dtype == torch.float32
            and s == k.shape[0] and BLOCKED_MIN_SEQ <= s < BLOCKED_MAX_SEQ and d >= BLOCKED_MIN_HEAD_DIM
            and b * n * d >= BLOCKED_MIN_WIDTH and not torch.compiler.is_compiling())


def attention(q, k, v, causal: bool, mask: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0,
              gqa: Optional[bool] = None):
    """q: [sq, b, n, d]; k, v: [sk, b, ng, d] with ng dividing n. Returns [sq, b, n*d].
    ``gqa`` (ng != n) given by a caller under torch.compile, where comparing shapes is symbolic."""
    if _state.backend() == "npu":
        return attention_npu(q, k, v, causal, mask, scale, dropout_p)
    if blocked_applies(q, k, causal, mask, dropout_p):
        return attention_blocked(q, k, v, scale)
    return attention_sdpa(q, k, v, causal, mask, scale, dropout_p, gqa)


def attention_npu_tnd(q, k, v, cu_seqlens: torch.Tensor, scale: float, dropout_p: float):
    import torch_npu

    ends = cu_seqlens[1:].tolist()  # the wheel's convention: each sequence's end, a prefix sum
    return torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], "TND", atten_mask=compressed_causal_mask(q.device), scale=scale,
        keep_prob=1.0 - dropout_p, actual_seq_qlen=ends, actual_seq_kvlen=ends, sparse_mode=3,
    )[0]


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def attention_per_sequence(q, k, v, cu_seqlens: torch.Tensor, scale: float, dropout_p: float):
    """SDPA on each sequence of the pack: [t, n, d] -> [t, n, dv], causal within a sequence."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, len, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, 0)


def attention_thd(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: Optional[int], scale: float,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """q: [t, n, d]; k, v: [t, ng, d]; sequences end at cu_seqlens[1:]. Returns [t, n*dv]."""
    t = q.shape[0]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t:
        raise ValueError(f"packed attention: cu_seqlens must run from 0 to the {t} tokens of the pack, "
                         f"got {cu_seqlens[0]}..{cu_seqlens[-1]}")
    if _state.backend() == "npu":
        out = attention_npu_tnd(q, k, v, cu_seqlens, scale, dropout_p)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen():
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        longest = max_seqlen or int((cu[1:] - cu[:-1]).max())
        out = _flash_attn_varlen()(q, k, v, cu, cu, longest, longest, dropout_p=dropout_p, softmax_scale=scale,
                                   causal=True)
    else:
        out = attention_per_sequence(q, k, v, cu_seqlens, scale, dropout_p)
    return out.reshape(t, -1)


def attention_reference(q, k, v, causal: bool, mask: Optional[torch.Tensor], scale: float):
    """Plain softmax(QK^T)V in float32 with explicit k/v repetition, for tests."""
    sq, b, n, d = q.shape
    rep = n // k.shape[2]
    qf, kf, vf = (t.float().permute(1, 2, 0, 3) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    scores = qf @ kf.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(sq, k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask.bool(), float("-inf"))
    out = scores.softmax(-1) @ vf
    return out.permute(2, 0, 1, 3).reshape(sq, b, -1).to(q.dtype)


def _unsupported(module, attention_bias) -> Optional[str]:
    if attention_bias is not None:
        return "attention bias"
    if getattr(module, "softmax_offset", None) is not None:  # megatron-core 0.15+
        return f"softmax_type={module.config.softmax_type}"
    if getattr(module.scale_mask_softmax, "window_size", None) is not None:  # 0.15+
        return "sliding-window attention"
    return None


def packed_seqlens(module, packed_seq_params, attn_mask_type) -> torch.Tensor:
    """The pack's cu_seqlens, or a ValueError naming what this attention cannot serve: a packed
    batch is never run as one sequence (that would attend across samples)."""
    from megatron.core.transformer.enums import AttnMaskType

    p = packed_seq_params
    problems = []
    if p.qkv_format != "thd":
        problems.append(f"qkv_format={p.qkv_format!r} (only 'thd')")
    if p.cu_seqlens_q is None or p.cu_seqlens_kv is None:
        problems.append("cu_seqlens_q / cu_seqlens_kv missing")
    elif not torch.equal(p.cu_seqlens_q, p.cu_seqlens_kv):
        problems.append("cu_seqlens_q != cu_seqlens_kv (self-attention over the same sequences only)")
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(p, name, None)
        if padded is not None and p.cu_seqlens_q is not None and not torch.equal(padded, p.cu_seqlens_q):
            problems.append(f"{name} differs from cu_seqlens_q (per-sequence padding)")
    mask_type = module.attn_mask_type if attn_mask_type is None else attn_mask_type
    if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
        problems.append(f"attn_mask_type={mask_type.name} (only causal)")
    if _unsupported(module, None):
        problems.append(_unsupported(module, None))
    if module.config.context_parallel_size > 1:
        problems.append(f"context_parallel_size={module.config.context_parallel_size}")
    if problems:
        raise ValueError("ascend_patches packed-sequence attention cannot serve this batch: " + "; ".join(problems))
    return p.cu_seqlens_q


def dot_product_attention_forward(original):
    """Wrap ``DotProductAttention.forward``. Packed (THD) batches take ``attention_thd``, or a
    ValueError naming what is not covered; under context parallelism, ``context_parallel.forward``
    (ring attention) or a ValueError. Other inputs the fused kernel does not cover
    (attention bias, softmax offsets, sliding windows) run stock code, with a one-time warning
    naming the reason."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            if attention_bias is not None:
                raise ValueError("ascend_patches packed-sequence attention cannot serve this batch: attention bias")
            cu_seqlens = packed_seqlens(self, packed_seq_params, attn_mask_type)
            scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
            dropout_p = self.attention_dropout.p if self.training else 0.0
            longest = packed_seq_params.max_seqlen_q
            if dropout_p > 0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    return attention_thd(query, key, value, cu_seqlens, longest, scale, dropout_p)
            return attention_thd(query, key, value, cu_seqlens, longest, scale, dropout_p)
        reason = _unsupported(self, attention_bias)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        if self.config.context_parallel_size > 1:
            if reason:
                raise ValueError(f"ascend_patches context-parallel attention cannot serve this batch: {reason}")
            return context_parallel.forward(self, query, key, value, attention_mask, mask_type, scale, attention)
        if reason:
            warn_once(f"ascend_patches flash attention does not cover {reason}; "
                      "running stock DotProductAttention for it")
            return original(self, query, key, value, attention_mask, attn_mask_type,
                            attention_bias, packed_seq_params)
        # megatron passes no_mask once a KV cache holds earlier tokens; honour it over the layer's default
        causal = mask_type == AttnMaskType.causal and attention_mask is None and query.shape[0] > 1
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attention(query, key, value, causal, attention_mask, scale, dropout_p)
        return attention(query, key, value, causal, attention_mask, scale, dropout_p)

    return forward
