"""Gradient accumulation fusion: weight gradients go straight into megatron's fp32
``main_grad`` buffer instead of through a fresh ``param.grad`` that DDP's hook then adds in.

Megatron's ``gradient_accumulation_fusion`` needs Apex's CUDA-only
``fused_weight_gradient_mlp_cuda``; without it megatron refuses the flag, and every
micro-batch allocates a gradient the size of each weight, then reads it back to add it to
``main_grad``.  On the CPU, for a 168M-parameter model that is ~2 GB of memory traffic and
a fresh 131 MB zero-filled embedding gradient per micro-batch.

- Linear layers (``wgrad_gemm_accum_fp32``/``_fp16``, the contract megatron calls):
  ``main_grad += grad_output^T @ input``.  fp32 inputs: one in-place ``addmm_`` (the BLAS
  beta=1 accumulate, no temporary).  bf16/fp16 inputs: the CPU has no GEMM with a wider
  output type than its inputs (``torch.mm(..., out_dtype=)`` is CUDA-only in torch 2.13),
  so the product is rounded to the input type and then added, exactly as megatron's
  unfused path does; only the ``param.grad`` round trip is saved.
- The word embedding (a wrapped ``VocabParallelEmbedding.forward``): its backward
  ``index_add_``s the rows it used into ``main_grad`` (in main_grad's precision), instead of
  materialising a zero-filled [vocab, hidden] gradient.

NPU: torch_npu ships no such kernel either; the patch is CPU-only until one is measured.
The recipes turn the flag on (Megatron-LM's default; ``--no-gradient-accumulation-fusion``
turns it off) only where every trained weight has a ``main_grad`` (DDP-wrapped, no LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(main_grad):
    if main_grad is None:
        raise RuntimeError("gradient_accumulation_fusion needs weight.main_grad (a megatron DDP-wrapped model "
                           "whose weights all train); turn the config's gradient_accumulation_fusion off")


class CpuWgradAccum:
    """What megatron calls as ``fused_weight_gradient_mlp_cuda``: (input [n, in],
    grad_output [n, out], main_grad [out, in])."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        _check(main_grad)
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            main_grad.add_(torch.mm(grad_output.t(), total_input))

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        _check(main_grad)
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


def available() -> bool:
    """Whether megatron will accept ``gradient_accumulation_fusion=True`` here (Apex on
    CUDA, or the CPU patch applied)."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = weight.main_grad
        main_grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype))
        weight.grad_added_to_main_grad = True
        # megatron's own fused linear does the same: an untouched placeholder so DDP's
        # hook still runs (and skips its add) on the autograd thread
        return None, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _fusable(emb) -> bool:
    w = emb.weight
    return (torch.is_grad_enabled() and w.requires_grad and getattr(w, "main_grad", None) is not None
            and hasattr(w, "grad_added_to_main_grad") and not emb.deterministic_mode
            and not emb.reduce_scatter_embeddings and getattr(emb, "_ap_accumulate_in_main_grad", False))


def vocab_embedding_forward(original):
    """Wrap ``VocabParallelEmbedding.forward``.  Applies when the model was built with
    ``gradient_accumulation_fusion`` and DDP gave the weight a ``main_grad``; otherwise (and
    in megatron's deterministic mode, or with sequence-parallel reduce-scatter embeddings)
    stock code runs."""

    def forward(self, input_):
        if not _fusable(self):
            return original(self, input_)
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        tp = self.tp_group.size()
        if tp > 1:  # rows another rank owns look up row 0 here and are zeroed, as in stock
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            ids = input_ - self.vocab_start_index
            ids[input_mask] = 0
        else:
            ids = input_
        out = _EmbeddingIntoMainGrad.apply(ids, self.weight)
        if tp > 1:
            out[input_mask, :] = 0.0
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    return forward


def vocab_embedding_init(original):
    """Wrap ``VocabParallelEmbedding.__init__`` to note the config's
    ``gradient_accumulation_fusion`` (the embedding keeps no config of its own)."""

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._ap_accumulate_in_main_grad = bool(getattr(kwargs.get("config"), "gradient_accumulation_fusion", False))

    return __init__
