"""A loaded Megatron GPTModel for inference at any TP/PP, shared by generate and evaluate.

``add_checkpoint_flags`` + ``settings.checkpoint`` + ``open_checkpoint`` are the one front end
from command-line flags (``--load``, ``--lora-load``, the tokenizer, TP/PP, ``--params-dtype``)
to a loaded model and its tokenizer, so every inference command reads them the same way.

Every rank calls the same methods in lockstep.  Pipeline stages pass hidden states forward
with point-to-point sends; the last stage gathers the tensor-parallel logits and broadcasts
what the caller needs (logits or chosen tokens) back along the pipeline, so every rank
returns the same answer.  Decoding keeps K/V in megatron's ``StaticInferenceContext``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

import ascend_patches

from recipes.data.tokenizer import add_tokenizer_flags, load_tokenizer
from recipes.errors import BadInput
from recipes.model import checkpointing, flags, llama2, parallel


@dataclass
class Loaded:
    model: torch.nn.Module
    shape: llama2.LlamaShape
    vocab_size: int
    padded_vocab: int
    dtype: torch.dtype
    args: dict


def load(load_dir, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None, seed: int = 1234,
         lora_load=None, saved: Optional[dict] = None) -> Loaded:
    """Initialise the process groups and load the latest checkpoint of ``load_dir`` (plus, with
    ``lora_load``, a LoRA checkpoint's adapters on top, unmerged).  ``saved``: its
    ``args.json`` when the caller has read it already."""
    from megatron.core import parallel_state as ps

    saved = saved or checkpointing.load_args(load_dir)
    shape = llama2.LlamaShape(**saved["shape"])
    padded = saved.get("padded_vocab_size") or shape.vocab_size
    vocab = saved.get("vocab_size") or shape.vocab_size
    llama2.check_layout(shape, tp, pp, padded_vocab=padded)  # the world size: init_distributed checks it
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
        from recipes.model import lora

        cfg = lora.read_config(lora_load)
        wrapped = lora.apply_lora(model, cfg["target_modules"], cfg["r"], cfg["alpha"], 0.0, cfg["modules_to_save"])
        lora.load(lora_load, model, wrapped, restore_rng=False)
    model.eval()
    return Loaded(model, shape, vocab, padded, dtype, saved)


def add_checkpoint_flags(p, lora: str = "applied unmerged") -> None:
    """The flags every inference command takes to open a checkpoint; ``lora``: what the command
    does with --lora-load's adapters."""
    flags.add_load_flags(p, "the model", lora, required=True)
    add_tokenizer_flags(p, "the one the checkpoint records")
    flags.add_layout_flags(p, "default: the world size / PP", "default 1")
    flags.add_dtype_flag(p, "the checkpoint's")


def open_checkpoint(c):
    """(``Loaded``, tokenizer) from the settings of ``add_checkpoint_flags``' flags
    (``recipes.infer.settings.checkpoint``)."""
    saved = checkpointing.load_args(c.load)
    tok_path = c.tokenizer or saved.get("tokenizer_name_or_path")
    if not tok_path:
        raise BadInput(f"{c.load} records no tokenizer: give --tokenizer-name-or-path")
    tokenizer = load_tokenizer(tok_path, c.tokenizer_type)
    if saved.get("vocab_size") is None:  # Megatron-LM records only the padded rows: the rest is the tokenizer's
        saved = dict(saved, vocab_size=tokenizer.vocab_size)
    return load(c.load, c.tp, c.pp, c.dtype, lora_load=c.lora_load, saved=saved), tokenizer


class StageInfo(NamedTuple):
    """This rank's place in the pipeline, kept by callers that step many times."""
    first: bool
    last: bool
    group: object
    prev_rank: int
    next_rank: int
    last_rank: int


def stage_info() -> StageInfo:
    from megatron.core import parallel_state as ps

    return StageInfo(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), ps.get_pipeline_model_parallel_group(),
                     ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank(),
                     ps.get_pipeline_model_parallel_last_rank())


@torch.no_grad()
def forward(lm: Loaded, tokens: torch.Tensor, position_ids: torch.Tensor, context=None,
            stage=None, attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Run the pipeline; the last stage returns full-vocabulary fp32 logits [b, s, vocab]
    (only the last position when ``context`` materialises only the last token), others None.
    ``stage``: ``stage_info()`` kept by a caller that steps many times.  ``attention_mask``:
    megatron's convention, [b, 1, s, keys] with True where a query may not look (it then
    replaces the causal mask)."""
    stage = stage or stage_info()
    b, s = tokens.shape
    device = ascend_patches.device()
    tokens, position_ids = tokens.to(device), position_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    if not stage.first:
        hidden = torch.empty(s, b, lm.shape.hidden_size, dtype=lm.dtype, device=device)
        dist.recv(hidden, src=stage.prev_rank)
        lm.model.set_input_tensor(hidden)
    out = lm.model(tokens, position_ids, attention_mask=attention_mask, inference_context=context,
                   runtime_gather_output=True)  # full-vocabulary logits on every TP rank
    if not stage.last:
        dist.send(out.contiguous(), dst=stage.next_rank)
        return None
    return out[..., :lm.vocab_size].float()


def broadcast_from_last_stage(t: Optional[torch.Tensor], like_shape, dtype, stage=None) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage (on the accelerator)."""
    stage = stage or stage_info()
    if dist.get_world_size(stage.group) == 1:
        return t
    if not stage.last:
        t = torch.empty(like_shape, dtype=dtype, device=ascend_patches.device())
    t = t.contiguous()
    dist.broadcast(t, src=stage.last_rank, group=stage.group)
    return t


def full_logits(lm: Loaded, tokens: torch.Tensor) -> torch.Tensor:
    """Logits for every position of ``tokens`` [b, s] (no KV cache), on every rank, in host memory."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    logits = forward(lm, tokens, pos)
    return broadcast_from_last_stage(logits, (b, s, lm.vocab_size), torch.float32).cpu()
