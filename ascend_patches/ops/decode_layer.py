"""One fused decode step of a LLaMA transformer layer (one new token per sequence, K/V cached).

Megatron's TransformerLayer runs a decode step through ~40 Python-level module calls (layer
norm modules, attention with its inference bookkeeping, bias-dropout-add, MLP).  For one
token on a CPU (and for small models anywhere) that bookkeeping costs more than the math.
This is the same math in one function: RMSNorm -> QKV -> K/V written into megatron's own
``StaticInferenceContext`` buffers (before RoPE, as megatron keeps them) -> RoPE -> attention
over the cache -> projection (+TP all-reduce) -> residual -> RMSNorm -> SwiGLU MLP (+TP
all-reduce) -> residual.  The weights are the layer's own and the cache is megatron's, so
prefill (stock path) and decode interleave; its logits equal the stock layer's bit for bit
on the CPU (tests/test_generate.py).

With ``compile_decode`` on (see ``settings.py``), a TP=1 one-stage model's whole step goes
through ``torch.compile``: the same ``layer_math``, with attention as two grouped matmuls so
the compiler fuses the softmax; equal to the stock logits to rounding.

It applies only where its assumptions hold (no_grad, eval, static batching, one query token,
a populated cache, plain megatron linears - not LoRA-wrapped -, gated SiLU MLP, no biases, no
QK norm, full non-interleaved RoPE, no sequence parallelism, no MoE); anything else runs the
stock layer.  On the NPU the attention call is ``npu_fusion_attention`` as in flash_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _state
from .flash_attention import attention
from .rms_norm import FusedRMSNorm, rms_norm

_MC = {}  # megatron classes, imported once on first use (this module loads before megatron may)


def _megatron():
    if not _MC:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, mappings
        from megatron.core.transformer.identity_op import IdentityOp

        _MC.update(column=ColumnParallelLinear, row=RowParallelLinear, mappings=mappings, identity=IdentityOp)
    return _MC


def _config_ok(cfg) -> bool:
    return not (cfg.sequence_parallel or cfg.add_bias_linear or not cfg.gated_linear_unit
                or cfg.activation_func is not F.silu or getattr(cfg, "num_moe_experts", None)
                or getattr(cfg, "rotary_interleaved", False))


def _decoding(module, ctx) -> bool:
    """Inference with a populated static cache: a decode step can be fused."""
    return (ctx is not None and not module.training and not torch.is_grad_enabled() and ctx.is_static_batching()
            and ctx.sequence_len_offset != 0)


def _eligible(layer, ctx) -> bool:
    """The layer and cache fit the fused step (the caller checks there is one new token)."""
    return _decoding(layer, ctx) and _layer_ok(layer, ctx) and _config_ok(layer.config)


def _layer_ok(layer, ctx) -> bool:
    return layer.layer_number in ctx.key_value_memory_dict and _layer_ok_types(layer)


def _layer_ok_types(layer) -> bool:
    mc = _megatron()
    mods = layer._modules
    attn, mlp = mods.get("self_attention"), mods.get("mlp")
    if attn is None or mlp is None:
        return False
    a, m = attn._modules, mlp._modules
    if not (_identity(a.get("q_layernorm"), mc) and _identity(a.get("k_layernorm"), mc)):
        return False
    # exact types: LoRA wrappers take the stock path
    return (type(a.get("linear_qkv")) is mc["column"] and type(a.get("linear_proj")) is mc["row"]
            and type(m.get("linear_fc1")) is mc["column"] and type(m.get("linear_fc2")) is mc["row"])


def _identity(module, mc) -> bool:
    return module is None or isinstance(module, mc["identity"])


_TABLE = {}  # megatron builds the RoPE table once per length (lru-cached) and hands every layer the same tensor


def _rope_table(freqs: torch.Tensor, dtype):
    """(cos, sin with rotate-half's sign folded in, the rotate-half permutation) of a RoPE table,
    computed once per table: the entry holds the table itself, so its id cannot be reused by
    another tensor while the entry lives.  ``t*cos + t[..., perm]*signed_sin`` equals megatron's
    ``t*cos + cat(-t2, t1)*sin`` bit for bit (negation commutes exactly with multiplication)
    in 4 ops instead of 7."""
    entry = _TABLE.get((id(freqs), dtype))
    if entry is None or entry[0] is not freqs:
        if len(_TABLE) > 8:
            _TABLE.clear()
        d = freqs.shape[-1]
        half = d // 2
        perm = torch.cat((torch.arange(half, d), torch.arange(half))).to(freqs.device)
        sign = torch.cat((-torch.ones(half), torch.ones(d - half))).to(freqs.device, dtype)
        sin = torch.sin(freqs).to(dtype)
        entry = _TABLE[(id(freqs), dtype)] = (freqs, torch.cos(freqs).to(dtype), sin * sign, perm)
    return entry[1:]


def _rotate(t, cos, signed_sin, perm):
    return t * cos + t.index_select(-1, perm) * signed_sin


def _tables(rotary_pos_emb, dtype):
    """((cos, signed_sin, perm) for queries, the same for keys)."""
    q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
    q = _rope_table(q_freqs, dtype)
    return q, (q if k_freqs is q_freqs else _rope_table(k_freqs, dtype))


def _norm(module, x):
    if type(module) is FusedRMSNorm:
        return rms_norm(x, module.weight, module.eps)  # the module's own forward, without Module.__call__
    return module(x)


def _no_reduce(x, group):
    return x


def grouped_attention(q, keys, values, scale):
    """softmax(q k^T * scale) v for one query per sequence as two batched matmuls per kv group
    (no repeated k/v): q [1, b, ng, per, d], keys/values [L, b, ng, d] -> [1, b, ng*per*d].
    The compiled step's attention: it lets torch.compile fuse the softmax, where the SDPA
    kernel's per-call setup dominates at one query."""
    _, b, ng, per, d = q.shape
    scores = torch.matmul(q[0], keys.permute(1, 2, 3, 0)) * scale  # [b, ng, per, L]
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values.permute(1, 2, 0, 3)).reshape(1, b, ng * per * d)


def step_tables(tables, pos: int):
    """The RoPE rows one decode step uses (the new query's position; every key's), sliced
    once per step rather than once per layer."""
    (cos_q, sin_q, perm_q), (cos_k, sin_k, perm_k) = tables
    return (cos_q.narrow(0, pos, 1), sin_q.narrow(0, pos, 1), perm_q,
            cos_k.narrow(0, 0, pos + 1), sin_k.narrow(0, 0, pos + 1), perm_k)


def layer_math(hidden, norm1, w_qkv, w_proj, norm2, w_fc1, w_fc2, k_mem, v_mem, pos: int, b0: int, rope, dims,
               reduce, grouped: bool = False):
    """One layer, one new token per sequence, on plain tensors (shared by the eager and the
    compiled step).  ``rope``: ``step_tables``.  ``dims``: (heads, kv groups, head dim, softmax
    scale, TP group, heads != kv groups - a plain bool, which torch.compile keeps constant where
    it makes ints symbolic).  The cache's keys are before RoPE (as megatron keeps them), so the
    whole prefix is rotated each step, as megatron's own step does."""
    nh, ng, d, scale, group, gqa = dims
    per = nh // ng
    b = hidden.shape[1]
    cos_q, sin_q, perm_q, cos_k, sin_k, perm_k = rope
    qkv = F.linear(norm1(hidden), w_qkv).view(1, b, ng, (per + 2) * d)
    q, k, v = qkv.split([per * d, d, d], dim=3)
    if b0 != 0 or b != k_mem.shape[1]:  # a slice of the cache's batch
        k_mem, v_mem = k_mem.narrow(1, b0, b), v_mem.narrow(1, b0, b)
    k_mem.narrow(0, pos, 1).copy_(k)
    v_mem.narrow(0, pos, 1).copy_(v)
    keys, values = k_mem.narrow(0, 0, pos + 1), v_mem.narrow(0, 0, pos + 1)
    q = _rotate(q.unflatten(-1, (per, d)), cos_q, sin_q, perm_q)
    keys = _rotate(keys, cos_k, sin_k, perm_k)
    if grouped:
        ctx_out = grouped_attention(q, keys, values, scale)
    else:
        ctx_out = attention(q.reshape(1, b, nh, d), keys, values, False, None, scale, gqa=gqa)  # [1, b, nh * d]
    hidden = hidden + reduce(F.linear(ctx_out, w_proj), group)
    gate, up = F.linear(norm2(hidden), w_fc1).chunk(2, dim=-1)
    return hidden + reduce(F.linear(F.silu(gate) * up, w_fc2), group)


def _dims(attn):
    core = attn.core_attention
    nh, ng = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    return (nh, ng, attn.hidden_size_per_attention_head, core.softmax_scale * (core.scale_mask_softmax.scale or 1.0),
            attn.linear_proj.tp_group, nh != ng)


def decode_step(layer, hidden, rope, ctx):
    """A megatron TransformerLayer's decode step through ``layer_math`` (``rope``: ``step_tables``)."""
    attn, mlp = layer.self_attention, layer.mlp
    k_mem, v_mem = ctx.key_value_memory_dict[layer.layer_number]
    reduce = _megatron()["mappings"]._reduce
    return layer_math(hidden, lambda x: _norm(layer.input_layernorm, x), attn.linear_qkv.weight,
                      attn.linear_proj.weight, lambda x: _norm(layer.pre_mlp_layernorm, x), mlp.linear_fc1.weight,
                      mlp.linear_fc2.weight, k_mem, v_mem, ctx.sequence_len_offset, ctx.batch_size_offset, rope,
                      _dims(attn), reduce)


def stack_math(hidden, pos: int, b0: int, layers, caches, final_norm, w_out, tables, dims):
    """Every layer, the final norm and the output layer of a TP=1 model, on plain tensors:
    what ``torch.compile`` turns into one kernel sequence.  ``layers``: per layer (norm1
    weight, eps, qkv, proj, norm2 weight, eps, fc1, fc2)."""
    rope = step_tables(tables, pos)
    for (n1, e1, w_qkv, w_proj, n2, e2, w_fc1, w_fc2), (k_mem, v_mem) in zip(layers, caches):
        hidden = layer_math(hidden, lambda x, w=n1, e=e1: rms_norm(x, w, e), w_qkv, w_proj,
                            lambda x, w=n2, e=e2: rms_norm(x, w, e), w_fc1, w_fc2, k_mem, v_mem, pos, b0, rope,
                            dims, _no_reduce, grouped=True)
    return F.linear(rms_norm(hidden, final_norm[0], final_norm[1]), w_out)


_COMPILED = {}


def _compiled_stack(dims):
    """One compiled step per attention shape (``dims`` held by a closure).  Sizes (batch,
    position, cache length) are dynamic, so a generation compiles once per batch size class
    (1, or 2 and up), not once per position."""
    if dims not in _COMPILED:
        def step(hidden, pos, b0, layers, caches, final_norm, w_out, tables):
            return stack_math(hidden, pos, b0, layers, caches, final_norm, w_out, tables, dims)

        _COMPILED[dims] = torch.compile(step, dynamic=True)
    return _COMPILED[dims]


def _compile_blocker(model) -> str:
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


def compile_unavailable(model) -> str:
    """Why the compiled decode step would not run for ``model`` ('' when it would), for a
    caller that asks for it to say so instead of silently running the eager step."""
    from .. import REGISTRY

    if REGISTRY.status.get("decode_model", ("",))[0] != "applied":
        return "the decode_model patch is not applied (see ascend_patches.report())"
    if not (model.pre_process and model.post_process):
        return "it needs one pipeline stage (PP=1)"
    if not all(_layer_ok_types(layer) for layer in model.decoder.layers) or not _config_ok(model.config):
        return "the model's layers are not plain LLaMA layers (LoRA adapters unmerged, biases, MoE, ...)"
    return _compile_blocker(model)


def _compiled_plan(model, ctx):
    """Per-layer weights in ``stack_math``'s order and the attention dims, or None where
    ``_compile_blocker`` refuses the model; worked out once per inference context (one
    generation: neither changes under it)."""
    cached = getattr(ctx, "_ascend_patches_plan", None)
    if cached is not None and cached[0] is model:
        return cached[1]
    plan = None
    if not _compile_blocker(model):
        layers = []
        for layer in model.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            layers.append((layer.input_layernorm.weight, layer.input_layernorm.eps, attn.linear_qkv.weight,
                           attn.linear_proj.weight, layer.pre_mlp_layernorm.weight, layer.pre_mlp_layernorm.eps,
                           mlp.linear_fc1.weight, mlp.linear_fc2.weight))
        final = model.decoder.final_layernorm
        nh, ng, d, scale, _, gqa = _dims(model.decoder.layers[0].self_attention)
        plan = (layers, [layer.layer_number for layer in model.decoder.layers], (final.weight, final.eps),
                model.output_layer.weight, (nh, ng, d, scale, None, gqa))
    ctx._ascend_patches_plan = (model, plan)
    return plan


COMPILED_STEPS = [0]  # steps taken through the compiled path (tests check that it ran)


def compiled_model_step(plan, hidden, tables, ctx):
    COMPILED_STEPS[0] += 1
    layers, numbers, final, w_out, dims = plan
    caches = [ctx.key_value_memory_dict[n] for n in numbers]  # re-read: beam search swaps them
    return _compiled_stack(dims)(hidden, ctx.sequence_len_offset, ctx.batch_size_offset, layers, caches, final,
                                 w_out, tables)


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
        rows = step_tables(_tables(rope, hidden.dtype), ctx.sequence_len_offset)
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
    if getattr(decoder, "final_layernorm", None) is None or len(layers) == 0 or not _config_ok(model.config):
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
        tables = _tables(rope, hidden.dtype)
        plan = _compiled_plan(self, ctx) if _state.current().compile_decode else None
        if plan is not None:
            logits = compiled_model_step(plan, hidden, tables, ctx)
        else:
            rows = step_tables(tables, ctx.sequence_len_offset)
            for layer in layers:
                hidden = decode_step(layer, hidden, rows, ctx)
            logits = F.linear(_norm(self.decoder.final_layernorm, hidden), self.output_layer.weight)
        if kwargs.get("runtime_gather_output") or self.output_layer.gather_output:
            gather = _megatron()["mappings"].gather_from_tensor_model_parallel_region
            logits = gather(logits, self.output_layer.tp_group)
        return logits.transpose(0, 1).contiguous()  # [b, 1, vocab], as GPTModel returns

    return forward
