"""LLaMA-2 sizes as data, and the stock ``GPTModel`` each one builds.

Shapes are the published HF configs (``docs/llama2.md``): RMSNorm eps 1e-5, rotate-half
RoPE theta 1e4 (1e6 for 34B, which uses CodeLlama-34B weights), SwiGLU, no biases, untied
embeddings, vocab 32000.  ``tiny`` is a CPU-sized GQA shape for tests.  ``RECIPE_DEFAULTS``
holds each size's training defaults (AscendSpeed's LLaMA-2 scripts); every engine of the
pretrain recipe reads this one table.

``check_layout`` is the one rule set for whether a TP/PP layout fits a shape: pretraining,
inference, the converters and the LoRA merge all call it, so a checkpoint that one command
accepts is not refused by the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import ascend_patches

from recipes.errors import BadInput


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

    def describe(self) -> str:
        return (f"{self.num_layers} layers, hidden {self.hidden_size}, ffn {self.ffn_hidden_size}, "
                f"{self.num_attention_heads} heads, {self.num_query_groups} kv groups, vocab {self.vocab_size}")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaShape":
        """The inverse of ``hf_config``: a shape from an HF ``config.json``."""
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                   cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   cfg["vocab_size"], cfg.get("max_position_embeddings", 4096),
                   float(cfg.get("rope_theta", 10000.0)), cfg.get("rms_norm_eps", 1e-5))

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


# Per-size training defaults (AscendSpeed's LLaMA-2 scripts); flags override them.
RECIPE_DEFAULTS = {
    "llama2-7b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=1, micro_batch_size=4,
                      global_batch_size=16, lr=1.25e-6, min_lr=1.25e-7, seq_length=4096, bf16=True),
    "llama2-13b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=1, micro_batch_size=2,
                       global_batch_size=16, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-34b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=2, micro_batch_size=2,
                       global_batch_size=32, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-70b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=8, micro_batch_size=1,
                       global_batch_size=32, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-tiny": dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, micro_batch_size=4,
                        global_batch_size=8, lr=3e-3, min_lr=3e-4, seq_length=128, bf16=False),
}
# A shape given by flags, --hf-config or a checkpoint, with no --model
CUSTOM_DEFAULTS = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, micro_batch_size=1,
                       global_batch_size=8, lr=1e-4, min_lr=1e-5, seq_length=None, bf16=False)

# Megatron-LM / AscendSpeed flags that a LLaMA-2 launch script passes to say what every shape
# here already is.  The recipe accepts them so the script pastes in; a value other than the
# one given here contradicts the architecture and is refused.  (flag, dest, LLaMA-2's value)
ARCHITECTURE_FLAGS = (
    ("--swiglu", "swiglu", True),
    ("--normalization", "normalization", "RMSNorm"),
    ("--position-embedding-type", "position_embedding_type", "rope"),
    ("--use-rotary-position-embeddings", "use_rotary_position_embeddings", True),
    ("--no-position-embedding", "no_position_embedding", True),
    ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights", True),
    ("--disable-bias-linear", "disable_bias_linear", True),
)
# Kernel choices those scripts make: ascend_patches picks the accelerator's fused kernel for
# each (flash attention, which has no separate masked softmax and keeps its softmax in fp32;
# RMSNorm; SwiGLU; RoPE), so these are accepted and change nothing.  (flag, dest, why)
KERNEL_FLAGS = (
    ("--use-flash-attn", "use_flash_attn", "flash attention is always on (ascend_patches)"),
    ("--use-fused-rmsnorm", "use_fused_rmsnorm", "RMSNorm is always the fused kernel"),
    ("--use-fused-swiglu", "use_fused_swiglu", "SwiGLU is always the fused kernel"),
    ("--use-fused-rotary-pos-emb", "use_fused_rotary_pos_emb", "RoPE is always the fused kernel"),
    ("--no-masked-softmax-fusion", "no_masked_softmax_fusion", "flash attention has no separate masked softmax"),
    ("--attention-softmax-in-fp32", "attention_softmax_in_fp32", "flash attention keeps its softmax in fp32"),
    ("--use-mcore-models", "use_mcore_models", "the model is always Megatron-Core's GPTModel"),
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class LayoutError(BadInput):
    """A TP/PP layout that does not fit the model (every failing rule in one message)."""


def check_layout(shape: "LlamaShape", tp: int, pp: int, *, padded_vocab: Optional[int] = None,
                 world: Optional[int] = None, layers_per_virtual_stage: Optional[int] = None,
                 flag_prefix: str = "") -> None:
    """Raise ``LayoutError`` naming every rule the layout breaks: TP must divide the attention
    heads, kv groups, ffn size and (padded) vocabulary; PP may not exceed the layers (the
    first stage takes the remainder of an uneven split); virtual pipeline stages need an even
    split; the world size must be a multiple of TP x PP."""
    tp_flag, pp_flag = f"--{flag_prefix}tensor-model-parallel-size", f"--{flag_prefix}pipeline-model-parallel-size"
    problems = []
    for n, what in ((shape.num_attention_heads, f"{shape.num_attention_heads} attention heads"),
                    (shape.num_query_groups, f"{shape.num_query_groups} kv groups"),
                    (shape.ffn_hidden_size, f"ffn size {shape.ffn_hidden_size}"),
                    (padded_vocab, f"the padded vocabulary {padded_vocab}")):
        if n is not None and n % tp:
            problems.append(f"{tp_flag} {tp} does not divide {what}")
    if pp > shape.num_layers:
        problems.append(f"{pp_flag} {pp} is more than the {shape.num_layers} layers")
    elif layers_per_virtual_stage:
        if shape.num_layers % pp:
            problems.append(f"virtual pipeline stages need {pp_flag} {pp} to divide the {shape.num_layers} layers")
        elif (shape.num_layers // pp) % layers_per_virtual_stage:
            problems.append(f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} does not divide "
                            f"the {shape.num_layers // pp} layers per pipeline stage")
    if world is not None and world % (tp * pp):
        problems.append(f"the world size {world} is not a multiple of TP {tp} x PP {pp}")
    if problems:
        raise LayoutError(f"TP={tp} PP={pp} does not fit the model ({shape.describe()}): " + "; ".join(problems))


def shape(name: str) -> LlamaShape:
    try:
        return SIZES[name]
    except KeyError:
        raise BadInput(f"unknown model {name!r}; choose one of {', '.join(SIZES)}") from None


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
        use_cpu_initialization=ascend_patches.settings().backend == "cpu", init_method_std=0.02,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def initialisation(on_the_host: bool) -> dict:
    """TransformerConfig's ``use_cpu_initialization`` for Megatron-LM's flag: the host's
    initialisation when asked; otherwise ``transformer_config``'s default (the host on the CPU
    backend, each rank's shard on its accelerator elsewhere)."""
    return {"use_cpu_initialization": True} if on_the_host else {}


def layer_spec():
    """Megatron-core's local (non-Transformer-Engine) GPT layer spec, stock."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def pipeline_split(num_layers: int, pp: int) -> dict:
    """TransformerConfig fields for PP stages: even when PP divides the layers, else the
    first stage takes the remainder (megatron's ``num_layers_in_first_pipeline_stage``)."""
    if pp > num_layers:
        raise BadInput(f"--pipeline-model-parallel-size {pp} is more than the {num_layers} layers")
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
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(),
        vocab_size=vocab_size or s.vocab_size, max_sequence_length=seq_length or s.seq_length,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=int(s.rope_theta) if float(s.rope_theta).is_integer() else s.rope_theta, **extra,
    )
    if any(p.is_meta for p in model.parameters()):
        return model  # built under torch.device("meta") to count or plan: no data to move
    return model.to(ascend_patches.device())  # as Megatron-LM's get_model: on the accelerator, however initialised


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
