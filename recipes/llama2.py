"""LLaMA-2 sizes as data, and the stock ``GPTModel`` each one builds.

Shapes are from ``shared/reference/llama2.md`` (HF config names): RMSNorm eps 1e-5,
rotate-half RoPE theta 1e4 (1e6 for 34B, which uses CodeLlama-34B weights), SwiGLU, no
biases, untied embeddings, vocab 32000.  ``tiny`` is a CPU-sized GQA shape for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int = 32000
    seq_length: int = 4096
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict:
        """The same shape as HF LlamaConfig kwargs."""
        return dict(
            num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, vocab_size=self.vocab_size,
            max_position_embeddings=self.seq_length, rope_theta=self.rope_theta,
            rms_norm_eps=self.norm_epsilon, tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False,
        )


SIZES: Dict[str, LlamaShape] = {
    "llama2-7b": LlamaShape(32, 4096, 11008, 32, 32),
    "llama2-13b": LlamaShape(40, 5120, 13824, 40, 40),
    "llama2-34b": LlamaShape(48, 8192, 22016, 64, 8, rope_theta=1e6),
    "llama2-70b": LlamaShape(80, 8192, 28672, 64, 8),
    "llama2-tiny": LlamaShape(2, 64, 176, 8, 4, vocab_size=512, seq_length=128),
}


def shape(name: str) -> LlamaShape:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SIZES)}") from None


def transformer_config(s: LlamaShape, **overrides):
    """A TransformerConfig for this shape; overrides take any TransformerConfig field
    (parallel sizes, dtype, dropout ...)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads, num_query_groups=s.num_query_groups,
        kv_channels=s.kv_channels, normalization="RMSNorm", layernorm_epsilon=s.norm_epsilon,
        activation_func=F.silu, gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, init_method_std=0.02,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec():
    """Megatron-core's local (non-Transformer-Engine) GPT layer spec, stock."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def pipeline_split(num_layers: int, pp: int) -> dict:
    """TransformerConfig fields for PP stages: even when PP divides the layers, else the
    first stage takes the remainder (megatron's ``num_layers_in_first_pipeline_stage``)."""
    if pp > num_layers:
        raise ValueError(f"--pipeline-model-parallel-size {pp} is more than the {num_layers} layers")
    if pp == 1 or num_layers % pp == 0:
        return {}
    per = num_layers // pp
    return {"num_layers_in_first_pipeline_stage": per + num_layers % pp}


def padded_vocab_size(vocab: int, divisible_by: int = 128, tp: int = 1) -> int:
    multiple = divisible_by * tp
    return ((vocab + multiple - 1) // multiple) * multiple


def build_model(s: LlamaShape, config=None, pre_process=True, post_process=True,
                vocab_size=None, seq_length=None, vp_stage=None, **config_overrides):
    """Stock megatron ``GPTModel`` for a LLaMA-2 shape (``vp_stage``: a virtual pipeline chunk)."""
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(s, **config_overrides)
    extra = {} if vp_stage is None else {"vp_stage": vp_stage}
    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(),
        vocab_size=vocab_size or s.vocab_size, max_sequence_length=seq_length or s.seq_length,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=int(s.rope_theta) if float(s.rope_theta).is_integer() else s.rope_theta, **extra,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_parameters_across_tp(model: torch.nn.Module) -> int:
    """Whole-model count seen from one TP rank: split tensors count TP times, replicated once."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    return sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())
