"""One fused decode step of a LLaMA transformer layer (one new token per sequence, K/V cached),
and of a whole one-stage GPTModel.

Megatron's TransformerLayer runs a decode step through ~40 Python-level module calls (layer
norm modules, attention with its inference bookkeeping, bias-dropout-add, MLP).  For one
token on a CPU (and for small models anywhere) that bookkeeping costs more than the math.
The patches here run the same math (``decode_math.layer_math``) in one function, with the
layer's own weights and megatron's own cache, so prefill (stock path) and decode interleave;
the logits equal the stock layer's bit for bit on the CPU (tests/test_generate.py).  With
``compile_decode`` on, a TP=1 one-stage model's step goes through ``decode_compiled``.

They apply only where their assumptions hold (no_grad, eval, static batching, one query
token, a populated cache, plain megatron linears - not LoRA-wrapped -, gated SiLU MLP, no
biases, no QK norm, full non-interleaved RoPE, no sequence parallelism, no MoE); anything
else runs the stock code.  On the NPU the attention call is ``npu_fusion_attention`` as in
flash_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _state
from . import decode_compiled
from .decode_math import (AttnDims, CacheSlot, LayerWeights, Norm, apply_norm, config_ok, layer_math,
                          layer_types_ok, megatron_classes, rope_tables, step_rows)


def _decoding(module, ctx) -> bool:
    """Inference with a populated static cache: a decode step can be fused."""
    return (ctx is not None and not module.training and not torch.is_grad_enabled() and ctx.is_static_batching()
            and ctx.sequence_len_offset != 0)


def _layer_ok(layer, ctx) -> bool:
    return layer.layer_number in ctx.key_value_memory_dict and layer_types_ok(layer)


def decode_step(layer, hidden, rope, ctx, parts=None):
    """A megatron TransformerLayer's decode step through ``layer_math`` (``rope``: ``step_rows``;
    ``parts``: the layer's (LayerWeights, AttnDims) when a caller keeps them)."""
    w, dims = parts or (LayerWeights.of(layer), AttnDims.of(layer.self_attention))
    k_mem, v_mem = ctx.key_value_memory_dict[layer.layer_number]  # re-read: beam search swaps them
    return layer_math(hidden, w, CacheSlot(k_mem, v_mem, ctx.sequence_len_offset, ctx.batch_size_offset),
                      rope, dims, megatron_classes()["mappings"]._reduce)


def _layer_parts(model, ctx):
    """Every layer's (LayerWeights, AttnDims), read off the modules once per generation and
    kept on its inference context (neither changes under it): at one token per step the ~40
    module attribute lookups per layer that build them are a visible share of the step."""
    cached = getattr(ctx, "_ascend_patches_layer_parts", None)
    if cached is not None and cached[0] is model:
        return cached[1]
    parts = tuple((LayerWeights.of(layer), AttnDims.of(layer.self_attention)) for layer in model.decoder.layers)
    ctx._ascend_patches_layer_parts = (model, parts)
    return parts


def transformer_layer_forward(original):
    def forward(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        ctx = kwargs.get("inference_context")
        rope = kwargs.get("rotary_pos_emb")
        if (hidden is None or rope is None or kwargs.get("packed_seq_params") is not None
                or kwargs.get("attention_mask") is not None or hidden.shape[0] != 1
                or not (_decoding(self, ctx) and _layer_ok(self, ctx) and config_ok(self.config))):
            return original(self, *args, **kwargs)
        freqs = rope[0] if isinstance(rope, tuple) else rope
        if freqs.shape[-1] != self.self_attention.hidden_size_per_attention_head:
            return original(self, *args, **kwargs)  # partial rotary
        rows = step_rows(rope_tables(rope, hidden.dtype), ctx.sequence_len_offset)
        return decode_step(self, hidden, rows, ctx), kwargs.get("context")

    return forward


_MODEL_KWARGS = ("decoder_input", "labels", "packed_seq_params", "attention_mask", "extra_block_kwargs", "loss_mask",
                 "padding_mask")


def _model_eligible(model, input_ids, ctx, kwargs) -> bool:
    if input_ids is None or input_ids.shape[1] != 1 or not _decoding(model, ctx):
        return False
    if not (model.pre_process and model.post_process) or getattr(model, "mtp_process", False):
        return False
    if model.position_embedding_type != "rope" or model.share_embeddings_and_output_weights:
        return False
    if any(kwargs.get(k) is not None for k in _MODEL_KWARGS):
        return False
    decoder = model.decoder
    layers = decoder.layers
    if getattr(decoder, "final_layernorm", None) is None or len(layers) == 0 or not config_ok(model.config):
        return False
    return all(_layer_ok(layer, ctx) for layer in layers)  # one config for every layer


def gpt_model_forward(original):
    """The whole GPTModel decode step (embedding, the fused layers, final norm, output layer)
    without megatron's pre/post-processing machinery; single pipeline stage only."""

    def forward(self, input_ids, position_ids, attention_mask=None, *args, **kwargs):
        ctx = kwargs.get("inference_context")
        if args or not _model_eligible(self, input_ids, ctx, dict(kwargs, attention_mask=attention_mask)):
            return original(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        rope = self.rotary_pos_emb(ctx.max_sequence_length)  # lru-cached by megatron: one table per length
        layers = self.decoder.layers
        if rope.shape[-1] != layers[0].self_attention.hidden_size_per_attention_head:
            return original(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [1, b, h]
        tables = rope_tables(rope, hidden.dtype)
        plan = decode_compiled.plan(self, ctx) if _state.current().compile_decode else None
        if plan is not None:
            logits = decode_compiled.model_step(plan, hidden, tables, ctx)
        else:
            rows = step_rows(tables, ctx.sequence_len_offset)
            for layer, parts in zip(layers, _layer_parts(self, ctx)):
                hidden = decode_step(layer, hidden, rows, ctx, parts)
            logits = F.linear(apply_norm(Norm.of(self.decoder.final_layernorm), hidden), self.output_layer.weight)
        if kwargs.get("runtime_gather_output") or self.output_layer.gather_output:
            gather = megatron_classes()["mappings"].gather_from_tensor_model_parallel_region
            logits = gather(logits, self.output_layer.tp_group)
        return logits.transpose(0, 1).contiguous()  # [b, 1, vocab], as GPTModel returns

    return forward
