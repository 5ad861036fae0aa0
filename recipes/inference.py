"""A loaded Megatron GPTModel for inference at any TP/PP, shared by generate and evaluate.

Every rank calls the same methods in lockstep.  Pipeline stages pass hidden states forward
with point-to-point sends; the last stage gathers the tensor-parallel logits and broadcasts
what the caller needs (logits or chosen tokens) back along the pipeline, so every rank
returns the same answer.  Decoding keeps K/V in megatron's ``StaticInferenceContext``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from recipes import checkpointing, llama2, parallel


@dataclass
class Loaded:
    model: torch.nn.Module
    shape: llama2.LlamaShape
    vocab_size: int
    padded_vocab: int
    dtype: torch.dtype
    args: dict


def load(load_dir, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None, seed: int = 1234,
         lora_load=None) -> Loaded:
    """Initialise the process groups and load the latest checkpoint of ``load_dir`` (plus, with
    ``lora_load``, a LoRA checkpoint's adapters on top, unmerged)."""
    from megatron.core import parallel_state as ps

    saved = checkpointing.load_args(load_dir)
    shape = llama2.LlamaShape(**saved["shape"])
    padded = saved.get("padded_vocab_size") or shape.vocab_size
    vocab = saved.get("vocab_size") or shape.vocab_size
    problems = []
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide {shape.num_attention_heads} heads / "
                        f"{shape.num_query_groups} kv groups")
    if padded % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide the checkpoint's padded vocabulary "
                        f"{padded}; reshard it with converters.reshard --tgt-tensor-model-parallel-size {tp}")
    if pp > shape.num_layers:
        problems.append(f"--pipeline-model-parallel-size {pp} is more than the {shape.num_layers} layers")
    if problems:
        raise ValueError(f"{load_dir}: " + "; ".join(problems))
    parallel.init_distributed(tp, pp, seed=seed)
    if dtype is None:
        dtype = torch.bfloat16 if saved.get("bf16") else torch.float16 if saved.get("fp16") else torch.float32
    config = llama2.transformer_config(shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                                       fp16=dtype == torch.float16, **llama2.pipeline_split(shape.num_layers, pp))
    model = llama2.build_model(shape, config=config, vocab_size=padded,
                               pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model = model.to(dtype)
    checkpointing.load(load_dir, [model], restore_rng=False)
    if lora_load:
        from recipes import lora

        cfg = lora.read_config(lora_load)
        wrapped = lora.apply_lora(model, cfg["target_modules"], cfg["r"], cfg["alpha"], 0.0, cfg["modules_to_save"])
        lora.load(lora_load, model, wrapped, restore_rng=False)
    model.eval()
    return Loaded(model, shape, vocab, padded, dtype, saved)


def stage_info():
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), ps.get_pipeline_model_parallel_group(),
            ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank(),
            ps.get_pipeline_model_parallel_last_rank())


@torch.no_grad()
def forward(lm: Loaded, tokens: torch.Tensor, position_ids: torch.Tensor, context=None,
            stage=None) -> Optional[torch.Tensor]:
    """Run the pipeline; the last stage returns full-vocabulary fp32 logits [b, s, vocab]
    (only the last position when ``context`` materialises only the last token), others None.
    ``stage``: ``stage_info()`` kept by a caller that steps many times."""
    first, last, _, prev, nxt, _ = stage or stage_info()
    b, s = tokens.shape
    if not first:
        hidden = torch.empty(s, b, lm.shape.hidden_size, dtype=lm.dtype)
        dist.recv(hidden, src=prev)
        lm.model.set_input_tensor(hidden)
    out = lm.model(tokens, position_ids, attention_mask=None, inference_context=context,
                   runtime_gather_output=True)  # full-vocabulary logits on every TP rank
    if not last:
        dist.send(out.contiguous(), dst=nxt)
        return None
    return out[..., :lm.vocab_size].float()


def broadcast_from_last_stage(t: Optional[torch.Tensor], like_shape, dtype, stage=None) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage."""
    _, last, group, _, _, last_rank = stage or stage_info()
    if dist.get_world_size(group) == 1:
        return t
    if not last:
        t = torch.empty(like_shape, dtype=dtype)
    t = t.contiguous()
    dist.broadcast(t, src=last_rank, group=group)
    return t


def full_logits(lm: Loaded, tokens: torch.Tensor) -> torch.Tensor:
    """Logits for every position of ``tokens`` [b, s] (no KV cache), on every rank."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    logits = forward(lm, tokens, pos)
    return broadcast_from_last_stage(logits, (b, s, lm.vocab_size), torch.float32)
