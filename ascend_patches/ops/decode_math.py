"""The math of one KV-cached decode step of a LLaMA layer, on plain tensors and named tuples.

Shared by the eager fused step (``decode_layer``) and the ``torch.compile``'d whole-model
step (``decode_compiled``): RMSNorm -> QKV -> K/V written into megatron's own
``StaticInferenceContext`` buffers (before RoPE, as megatron keeps them) -> RoPE -> attention
over the cache -> projection (+TP all-reduce) -> residual -> RMSNorm -> SwiGLU MLP (+TP
all-reduce) -> residual.  The structures are NamedTuples, which ``torch.compile`` traces as
plain tuples.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .flash_attention import attention
from .rms_norm import FusedRMSNorm, rms_norm


class Norm(NamedTuple):
    """A layer's RMSNorm: ``rms_norm(x, weight, eps)``, or ``module(x)`` for a norm module
    that is not ascend_patches' own (stock megatron's, with the rms_norm patch off)."""
    weight: torch.Tensor
    eps: float
    module: Optional[torch.nn.Module] = None

    @classmethod
    def of(cls, module) -> "Norm":
        if type(module) is FusedRMSNorm:
            return cls(module.weight, module.eps)
        return cls(None, 0.0, module)


def apply_norm(n: Norm, x):
    return rms_norm(x, n.weight, n.eps) if n.module is None else n.module(x)


class LayerWeights(NamedTuple):
    input_norm: Norm
    qkv: torch.Tensor
    proj: torch.Tensor
    mlp_norm: Norm
    fc1: torch.Tensor  # [gate; up]
    fc2: torch.Tensor

    @classmethod
    def of(cls, layer) -> "LayerWeights":
        attn, mlp = layer.self_attention, layer.mlp
        return cls(Norm.of(layer.input_layernorm), attn.linear_qkv.weight, attn.linear_proj.weight,
                   Norm.of(layer.pre_mlp_layernorm), mlp.linear_fc1.weight, mlp.linear_fc2.weight)


class AttnDims(NamedTuple):
    heads: int        # per TP rank
    groups: int       # kv groups per TP rank
    head_dim: int
    scale: float      # softmax scale
    tp_group: Any     # the TP process group (None in the compiled TP=1 step)
    gqa: bool         # heads != groups: a plain bool, which torch.compile keeps constant

    @classmethod
    def of(cls, attn, tp_group=True) -> "AttnDims":
        core = attn.core_attention
        nh, ng = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
        return cls(nh, ng, attn.hidden_size_per_attention_head,
                   core.softmax_scale * (core.scale_mask_softmax.scale or 1.0),
                   attn.linear_proj.tp_group if tp_group else None, nh != ng)


class RopeRows(NamedTuple):
    """The RoPE rows one step uses: the new query's position, and every cached key's."""
    cos_q: torch.Tensor
    sin_q: torch.Tensor  # the rotate-half sign folded in
    perm_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor
    perm_k: torch.Tensor


class CacheSlot(NamedTuple):
    """One layer's K/V buffers in megatron's cache and where this step writes."""
    keys: torch.Tensor    # [max_len, max_batch, groups, head_dim]
    values: torch.Tensor
    pos: int              # sequence offset of the new token
    batch_offset: int     # first cache row of this batch


# -- what the math assumes of a layer -------------------------------------------------
_MC = {}  # megatron classes, imported once on first use (this module loads before megatron may)


def megatron_classes():
    if not _MC:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, mappings
        from megatron.core.transformer.identity_op import IdentityOp

        _MC.update(column=ColumnParallelLinear, row=RowParallelLinear, mappings=mappings, identity=IdentityOp)
    return _MC


def config_ok(cfg) -> bool:
    return not (cfg.sequence_parallel or cfg.add_bias_linear or not cfg.gated_linear_unit
                or cfg.activation_func is not F.silu or getattr(cfg, "num_moe_experts", None)
                or getattr(cfg, "rotary_interleaved", False))


def _identity(module, mc) -> bool:
    return module is None or isinstance(module, mc["identity"])


def layer_types_ok(layer) -> bool:
    mc = megatron_classes()
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


def layers_fusable(model) -> bool:
    """Every layer of ``model`` has the plain LLaMA structure the fused step computes."""
    return all(layer_types_ok(layer) for layer in model.decoder.layers) and config_ok(model.config)



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


def rope_tables(rotary_pos_emb, dtype):
    """((cos, signed_sin, perm) for queries, the same for keys) of megatron's RoPE argument."""
    q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
    q = _rope_table(q_freqs, dtype)
    return q, (q if k_freqs is q_freqs else _rope_table(k_freqs, dtype))


def step_rows(tables, pos: int) -> RopeRows:
    """The rows of ``rope_tables`` one decode step uses, sliced once per step rather than per layer."""
    (cos_q, sin_q, perm_q), (cos_k, sin_k, perm_k) = tables
    return RopeRows(cos_q.narrow(0, pos, 1), sin_q.narrow(0, pos, 1), perm_q,
                    cos_k.narrow(0, 0, pos + 1), sin_k.narrow(0, 0, pos + 1), perm_k)


def _rotate(t, cos, signed_sin, perm):
    return t * cos + t.index_select(-1, perm) * signed_sin


def no_reduce(x, group):
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


def layer_math(hidden, w: LayerWeights, cache: CacheSlot, rope: RopeRows, dims: AttnDims, reduce,
               grouped: bool = False):
    """One layer, one new token per sequence.  The cache's keys are before RoPE (as megatron
    keeps them), so the whole prefix is rotated each step, as megatron's own step does."""
    per, d = dims.heads // dims.groups, dims.head_dim
    b = hidden.shape[1]
    qkv = F.linear(apply_norm(w.input_norm, hidden), w.qkv).view(1, b, dims.groups, (per + 2) * d)
    q, k, v = qkv.split([per * d, d, d], dim=3)
    k_mem, v_mem, pos = cache.keys, cache.values, cache.pos
    if cache.batch_offset != 0 or b != k_mem.shape[1]:  # a slice of the cache's batch
        k_mem, v_mem = k_mem.narrow(1, cache.batch_offset, b), v_mem.narrow(1, cache.batch_offset, b)
    k_mem.narrow(0, pos, 1).copy_(k)
    v_mem.narrow(0, pos, 1).copy_(v)
    keys, values = k_mem.narrow(0, 0, pos + 1), v_mem.narrow(0, 0, pos + 1)
    q = _rotate(q.unflatten(-1, (per, d)), rope.cos_q, rope.sin_q, rope.perm_q)
    keys = _rotate(keys, rope.cos_k, rope.sin_k, rope.perm_k)
    if grouped:
        ctx_out = grouped_attention(q, keys, values, dims.scale)
    else:
        ctx_out = attention(q.reshape(1, b, dims.heads, d), keys, values, False, None, dims.scale,
                            gqa=dims.gqa)  # [1, b, heads * d]
    hidden = hidden + reduce(F.linear(ctx_out, w.proj), dims.tp_group)
    gate, up = F.linear(apply_norm(w.mlp_norm, hidden), w.fc1).chunk(2, dim=-1)
    return hidden + reduce(F.linear(F.silu(gate) * up, w.fc2), dims.tp_group)
