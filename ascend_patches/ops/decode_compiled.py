"""The ``torch.compile``'d decode step of a whole TP=1, one-stage GPTModel (``compile_decode``).

Every layer's ``decode_math.layer_math`` (attention as two grouped matmuls, so the compiler
fuses the softmax), the final norm and the output layer go through one ``torch.compile``
with dynamic sizes, so a generation compiles once per batch-size class (1, or 2 and up), not
once per position.  It writes into megatron's own cache and re-reads it every step, so beam
search's reorder works.  Its logits equal the stock modules' to rounding (the compiler fuses
and reorders fp32 sums).
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .. import _state
from .decode_math import (AttnDims, CacheSlot, LayerWeights, Norm, apply_norm, layer_math, layers_fusable,
                          no_reduce, step_rows)
from .rms_norm import FusedRMSNorm


class Plan(NamedTuple):
    """What the compiled step needs of a model, worked out once per inference context."""
    layers: Tuple[LayerWeights, ...]
    numbers: Tuple[int, ...]  # megatron's layer_number of each: the cache's keys
    final_norm: Norm
    w_out: torch.Tensor
    dims: AttnDims


def stack_math(hidden, pos: int, b0: int, layers, caches, final_norm: Norm, w_out, tables, dims: AttnDims):
    rope = step_rows(tables, pos)
    for w, (k_mem, v_mem) in zip(layers, caches):
        hidden = layer_math(hidden, w, CacheSlot(k_mem, v_mem, pos, b0), rope, dims, no_reduce, grouped=True)
    return F.linear(apply_norm(final_norm, hidden), w_out)


_COMPILED = {}


def _compiled_stack(dims: AttnDims):
    """One compiled step per attention shape (``dims`` held by a closure)."""
    if dims not in _COMPILED:
        def step(hidden, pos, b0, layers, caches, final_norm, w_out, tables):
            return stack_math(hidden, pos, b0, layers, caches, final_norm, w_out, tables, dims)

        _COMPILED[dims] = torch.compile(step, dynamic=True)
    return _COMPILED[dims]


def blocker(model) -> str:
    """Why the compiled step cannot take this (otherwise eligible) model, '' if it can: it
    takes TP=1 models whose norms are the fused RMSNorm, on a CPU or CUDA backend
    (torch.compile has no NPU backend here)."""
    if _state.backend() not in ("cpu", "cuda"):
        return f"torch.compile is not used on the {_state.backend()} backend"
    if model.output_layer.tp_group.size() != 1:
        return "it needs TP=1"
    norms = [model.decoder.final_layernorm]
    for layer in model.decoder.layers:
        norms += [layer.input_layernorm, layer.pre_mlp_layernorm]
    if not all(type(n) is FusedRMSNorm for n in norms):
        return "the model's norms are not ascend_patches' RMSNorm"
    return ""


def unfit(model) -> str:
    """Why the compiled decode step cannot take ``model`` ('' when it can), the patch being
    applied (``ascend_patches.compiled_decode_unavailable`` asks that first)."""
    if not (model.pre_process and model.post_process):
        return "it needs one pipeline stage (PP=1)"
    if not layers_fusable(model):
        return "the model's layers are not plain LLaMA layers (LoRA adapters unmerged, biases, MoE, ...)"
    return blocker(model)


def plan(model, ctx):
    """The model's ``Plan``, or None where ``blocker`` refuses it; kept on the inference
    context (one generation: neither changes under it)."""
    cached = getattr(ctx, "_ascend_patches_plan", None)
    if cached is not None and cached[0] is model:
        return cached[1]
    result = None
    if not blocker(model):
        layers = model.decoder.layers
        result = Plan(tuple(LayerWeights.of(layer) for layer in layers), tuple(layer.layer_number for layer in layers),
                      Norm.of(model.decoder.final_layernorm), model.output_layer.weight,
                      AttnDims.of(layers[0].self_attention, tp_group=False))
    ctx._ascend_patches_plan = (model, result)
    return result


def model_step(p: Plan, hidden, tables, ctx):
    caches: List = [ctx.key_value_memory_dict[n] for n in p.numbers]  # re-read: beam search swaps them
    return _compiled_stack(p.dims)(hidden, ctx.sequence_len_offset, ctx.batch_size_offset, p.layers, caches,
                                   p.final_norm, p.w_out, tables)
