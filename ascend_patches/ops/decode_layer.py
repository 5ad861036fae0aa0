"""One fused decode step of a LLaMA transformer layer (one new token per sequence, K/V cached).

Megatron's TransformerLayer runs a decode step through ~40 Python-level module calls (layer
norm modules, attention with its inference bookkeeping, bias-dropout-add, MLP).  For one
token on a CPU (and for small models anywhere) that bookkeeping costs more than the math.
This is the same math in one function: RMSNorm -> QKV -> K/V written into megatron's own
``StaticInferenceContext`` buffers (before RoPE, as megatron keeps them) -> RoPE -> attention
over the cache -> projection (+TP all-reduce) -> residual -> RMSNorm -> SwiGLU MLP (+TP
all-reduce) -> residual.  The weights are the layer's own and the cache is megatron's, so
prefill (stock path) and decode interleave; its logits equal the stock layer's bit for bit
on the CPU (tests/test_ops.py).

It applies only where its assumptions hold (no_grad, eval, static batching, one query token,
a populated cache, plain megatron linears - not LoRA-wrapped -, gated SiLU MLP, no biases, no
QK norm, full non-interleaved RoPE, no sequence parallelism, no MoE); anything else runs the
stock layer.  On the NPU the attention call is ``npu_fusion_attention`` as in flash_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _eligible(layer, ctx) -> bool:
    """The layer and cache fit the fused step (the caller checks there is one new token)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if ctx is None or layer.training or torch.is_grad_enabled():
        return False
    if not ctx.is_static_batching() or ctx.sequence_len_offset == 0:
        return False
    cfg = layer.config
    attn, mlp = getattr(layer, "self_attention", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or layer.layer_number not in ctx.key_value_memory_dict:
        return False
    if (cfg.sequence_parallel or cfg.add_bias_linear or not cfg.gated_linear_unit or cfg.activation_func is not F.silu
            or getattr(cfg, "num_moe_experts", None) or getattr(cfg, "rotary_interleaved", False)
            or not _identity(getattr(attn, "q_layernorm", None)) or not _identity(getattr(attn, "k_layernorm", None))):
        return False
    linears = (getattr(attn, "linear_qkv", None), getattr(attn, "linear_proj", None),
               getattr(mlp, "linear_fc1", None), getattr(mlp, "linear_fc2", None))
    kinds = (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear)
    return all(type(m) is k for m, k in zip(linears, kinds))  # exact types: LoRA wrappers take the stock path


def _identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


_TABLE = {}  # one entry: megatron builds the RoPE table once per forward and hands every layer the same tensor


def _cos_sin(freqs: torch.Tensor, dtype):
    key = (id(freqs), freqs.data_ptr(), freqs.shape, dtype, float(freqs.view(-1)[-1]))
    if key not in _TABLE:
        _TABLE.clear()
        _TABLE[key] = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
    return _TABLE[key]


def _rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def decode_step(layer, hidden, rotary_pos_emb, ctx):
    from megatron.core.tensor_parallel import mappings

    attn, mlp = layer.self_attention, layer.mlp
    _, b, _ = hidden.shape
    nh, ng = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    d, per = attn.hidden_size_per_attention_head, nh // ng
    pos, b0 = ctx.sequence_len_offset, ctx.batch_size_offset
    tp_group = attn.linear_proj.tp_group if hasattr(attn.linear_proj, "tp_group") else None

    h = layer.input_layernorm(hidden)
    qkv = F.linear(h, attn.linear_qkv.weight).view(1, b, ng, (per + 2) * d)
    q, k, v = qkv.split([per * d, d, d], dim=3)
    q = q.reshape(1, b, nh, d)
    q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
    # megatron's cache holds keys before RoPE and rotates the whole prefix each step; so do we
    k_mem, v_mem = ctx.key_value_memory_dict[layer.layer_number]
    k_mem[pos, b0:b0 + b] = k[0]
    v_mem[pos, b0:b0 + b] = v[0]
    keys, values = k_mem[:pos + 1, b0:b0 + b], v_mem[:pos + 1, b0:b0 + b]
    cos_q, sin_q = _cos_sin(q_freqs, q.dtype)
    cos_k, sin_k = (cos_q, sin_q) if k_freqs is q_freqs else _cos_sin(k_freqs, q.dtype)
    q = _rotate(q, cos_q[pos:pos + 1], sin_q[pos:pos + 1])
    keys = _rotate(keys, cos_k[:pos + 1], sin_k[:pos + 1])
    core = attn.core_attention
    scale = core.softmax_scale * (core.scale_mask_softmax.scale or 1.0)
    from .flash_attention import attention

    ctx_out = attention(q, keys, values, False, None, scale)  # [1, b, nh * d]
    group = mappings.get_tensor_model_parallel_group_if_none(tp_group)
    o = mappings._reduce(F.linear(ctx_out, attn.linear_proj.weight), group)
    hidden = hidden + o
    h = layer.pre_mlp_layernorm(hidden)
    gate, up = F.linear(h, mlp.linear_fc1.weight).chunk(2, dim=-1)
    return hidden + mappings._reduce(F.linear(F.silu(gate) * up, mlp.linear_fc2.weight), group)


def transformer_layer_forward(original):
    def forward(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        ctx = kwargs.get("inference_context")
        rope = kwargs.get("rotary_pos_emb")
        if (hidden is None or rope is None or kwargs.get("packed_seq_params") is not None
                or kwargs.get("attention_mask") is not None or hidden.shape[0] != 1 or not _eligible(self, ctx)):
            return original(self, *args, **kwargs)
        freqs = rope[0] if isinstance(rope, tuple) else rope
        if freqs.shape[-1] != self.self_attention.hidden_size_per_attention_head:
            return original(self, *args, **kwargs)  # partial rotary
        return decode_step(self, hidden, rope, ctx), kwargs.get("context")

    return forward


def _model_eligible(model, input_ids, ctx, kwargs) -> bool:
    if ctx is None or model.training or torch.is_grad_enabled() or input_ids is None or input_ids.shape[1] != 1:
        return False
    if not (model.pre_process and model.post_process) or getattr(model, "mtp_process", False):
        return False
    if model.position_embedding_type != "rope" or model.share_embeddings_and_output_weights:
        return False
    if any(kwargs.get(k) is not None for k in ("decoder_input", "labels", "packed_seq_params", "attention_mask",
                                               "extra_block_kwargs", "loss_mask", "padding_mask")):
        return False
    decoder = model.decoder
    if getattr(decoder, "final_layernorm", None) is None or len(decoder.layers) == 0:
        return False
    return all(_eligible(layer, ctx) for layer in decoder.layers)


def gpt_model_forward(original):
    """The whole GPTModel decode step (embedding, the fused layers, final norm, output layer)
    without megatron's pre/post-processing machinery; single pipeline stage only."""

    def forward(self, input_ids, position_ids, attention_mask=None, *args, **kwargs):
        ctx = kwargs.get("inference_context")
        if args or not _model_eligible(self, input_ids, ctx, dict(kwargs, attention_mask=attention_mask)):
            return original(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        rope = self.rotary_pos_emb(ctx.max_sequence_length)  # lru-cached by megatron: one table per length
        if rope.shape[-1] != self.decoder.layers[0].self_attention.hidden_size_per_attention_head:
            return original(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [1, b, h]
        for layer in self.decoder.layers:
            hidden = decode_step(layer, hidden, rope, ctx)
        hidden = self.decoder.final_layernorm(hidden)
        logits = F.linear(hidden, self.output_layer.weight)
        if kwargs.get("runtime_gather_output") or self.output_layer.gather_output:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits.transpose(0, 1).contiguous()  # [b, 1, vocab], as GPTModel returns

    return forward
