"""One place for the tensor layout facts every converter shares.

Converters pass tensors through a *canonical* form: Megatron-Core's global (TP-independent)
tensor for each parameter, one layer at a time.  That is what ``dist_checkpointing`` stores,
so every reader (HF, torch_dist, AscendSpeed's legacy per-rank files) turns into it and every
writer starts from it.  The facts (``docs/layouts.md``):

- ``qkv``: per kv group, the group's query heads, then its key head, then its value head.
  Tensor parallelism splits whole groups, so rank r's rows are the r-th equal slice.
- ``fc1``: the full gate rows, then the full up rows (dist_checkpointing's swiglu layout);
  a rank's local fc1 is [gate_r ; up_r].
- no q/k permutation between HF and Megatron (both rotate-half).
- vocabulary rows padded to a multiple of divisible-by x TP with copies of the last row.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from recipes.errors import BadInput
from recipes.model.llama2 import LlamaShape  # converters and recipes share one shape type

LAYER_PARAMS = ("input_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2")
GLOBAL_PARAMS = ("embedding", "final_norm", "output")

# canonical name -> dist_checkpointing key of megatron's GPTModel (local and TE specs alike)
DIST_KEYS: Dict[str, str] = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
    "input_norm": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "qkv": "decoder.layers.self_attention.linear_qkv.weight",
    "proj": "decoder.layers.self_attention.linear_proj.weight",
    "mlp_norm": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "fc1": "decoder.layers.mlp.linear_fc1.weight",
    "fc2": "decoder.layers.mlp.linear_fc2.weight",
}

HF_GLOBAL = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "output": "lm_head.weight"}
HF_LAYER = {"input_norm": ("input_layernorm.weight",), "mlp_norm": ("post_attention_layernorm.weight",),
            "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "proj": ("self_attn.o_proj.weight",), "fc1": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "fc2": ("mlp.down_proj.weight",)}

# which dim tensor parallelism splits (None: replicated); fc1 is special (gate/up halves)
TP_DIM = {"embedding": 0, "output": 0, "final_norm": None, "input_norm": None, "mlp_norm": None,
          "qkv": 0, "proj": 1, "fc1": 0, "fc2": 1}


def expected(shape: LlamaShape, name: str, padded_vocab: Optional[int]) -> Tuple[int, ...]:
    """The canonical (global) shape of a tensor for this model."""
    h, d, nh, ng, f = (shape.hidden_size, shape.kv_channels, shape.num_attention_heads,
                       shape.num_query_groups, shape.ffn_hidden_size)
    return {"embedding": (padded_vocab, h), "output": (padded_vocab, h), "final_norm": (h,),
            "input_norm": (h,), "mlp_norm": (h,), "qkv": ((nh + 2 * ng) * d, h), "proj": (h, nh * d),
            "fc1": (2 * f, h), "fc2": (h, f)}[name]


def hf_config(shape: LlamaShape, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> dict:
    """config.json for ``transformers.LlamaForCausalLM``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape.hf_config(),
            "head_dim": shape.kv_channels, "hidden_act": "silu", "bos_token_id": bos_id, "eos_token_id": eos_id,
            "initializer_range": 0.02, "torch_dtype": str(dtype).replace("torch.", ""), "use_cache": True}


def hf_to_qkv(q, k, v, shape: LlamaShape):
    ng, d, h = shape.num_query_groups, shape.kv_channels, q.shape[1]
    per = shape.num_attention_heads // ng
    return torch.cat([q.reshape(ng, per * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], dim=1).reshape(-1, h)


def qkv_to_hf(qkv, shape: LlamaShape):
    ng, d = shape.num_query_groups, shape.kv_channels
    per = shape.num_attention_heads // ng
    h = qkv.shape[1]
    q, k, v = qkv.reshape(ng, (per + 2) * d, h).split([per * d, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def pad_vocab(t: torch.Tensor, rows: int, tensor_name: str) -> torch.Tensor:
    """Megatron's padding: extra rows are copies of the last real row; fewer rows trims."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows].contiguous()
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], -1)], dim=0)


def tp_split(name: str, t: torch.Tensor, tp: int):
    """The TP ranks' local pieces of a canonical tensor."""
    dim = TP_DIM[name]
    if dim is None:
        return [t] * tp
    if name == "fc1":
        gate, up = t.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
    return [c.contiguous() for c in t.chunk(tp, dim=dim)]


def tp_merge(name: str, pieces, where: str = "") -> torch.Tensor:
    """Inverse of ``tp_split``; replicated tensors must agree across ranks."""
    dim = TP_DIM[name]
    if dim is None:
        for i, p in enumerate(pieces[1:], 1):
            if not torch.equal(p, pieces[0]):
                raise BadInput(f"{where}{name}: replicated tensor differs between TP rank 0 and {i}")
        return pieces[0]
    if name == "fc1":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])], dim=0)
    return torch.cat(pieces, dim=dim)
