"""Every setting of an inference command, derived once from its flags into frozen typed
objects (as ``recipes.train.run_settings`` does for training): the checkpoint to open, how to
decode, and each command's own part.  Generation, chat, evaluation and the checkpoint front
end take these, never the argparse ``Namespace``; a bad value is refused here, before any
model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from recipes.errors import BadInput
from recipes.infer import decoding
from recipes.model import llama2


@dataclass(frozen=True)
class Checkpoint:
    load: str
    lora_load: Optional[str]
    tokenizer: Optional[str]  # default: the one the checkpoint records
    tokenizer_type: Optional[str]
    tp: int
    pp: int
    dtype: Optional[torch.dtype]  # default: the checkpoint's


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    sampling: decoding.SamplingParams
    do_sample: bool  # --do-sample as given: beam search samples only then
    seed: int
    num_beams: int
    length_penalty: float
    early_stopping: Union[bool, str]  # True, False or "never", as HF's generate takes it
    num_return_sequences: int
    return_log_probs: bool


@dataclass(frozen=True)
class Generate:
    checkpoint: Checkpoint
    decoding: Decoding
    prompts: Tuple[str, ...]
    interactive: bool
    system_prompt: Optional[str]
    show_prompt: bool
    bos: bool
    output_json: Optional[str]
    compile_decode: bool
    engine: str  # "auto", "static" or "dynamic" as given; recipes.infer.generate.choose_engine decides auto


@dataclass(frozen=True)
class Evaluate:
    checkpoint: Checkpoint
    task: str
    data_path: str
    num_fewshot: int
    limit: Optional[int]
    micro_batch_size: int
    seq_length: Optional[int]
    output_json: Optional[str]


def checkpoint(args) -> Checkpoint:
    """From ``inference.add_checkpoint_flags``' flags; TP defaults to the world size / PP."""
    pp = args.pipeline_model_parallel_size or 1
    tp = args.tensor_model_parallel_size or max(1, int(os.environ.get("WORLD_SIZE", "1")) // pp)
    dtype = llama2.DTYPES[args.params_dtype] if args.params_dtype else None
    return Checkpoint(str(args.load), args.lora_load, args.tokenizer_name_or_path, args.tokenizer_type, tp, pp, dtype)


def sampling(args) -> decoding.SamplingParams:
    """Greedy unless --do-sample or a sampling flag is given (and --greedy is not)."""
    sample = not args.greedy and (args.do_sample or any(v is not None for v in
                                                         (args.temperature, args.top_k, args.top_p)))
    if args.temperature is not None and args.temperature <= 0:
        raise BadInput("--temperature must be > 0 (use --greedy for argmax)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise BadInput("--top-p must be in (0, 1]")
    return decoding.SamplingParams(greedy=not sample, temperature=args.temperature or 1.0,
                                   top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)


def generate(args) -> Generate:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    d = Decoding(args.max_new_tokens, sampling(args), args.do_sample, args.seed, args.num_beams, args.length_penalty, early,
                 args.num_return_sequences, args.return_log_probs)
    return Generate(checkpoint(args), d, tuple(prompts or [""]),  # nothing given: unconditional, from BOS alone
                    args.interactive, args.system_prompt, args.show_prompt, not args.no_bos, args.output_json,
                    args.compile_decode, args.engine)


def evaluate(args) -> Evaluate:
    if args.task != "mmlu" and args.num_fewshot:
        raise BadInput("--num-fewshot is for MMLU; BoolQ is scored zero-shot")
    return Evaluate(checkpoint(args), args.task, str(args.task_data_path), args.num_fewshot, args.limit,
                    args.micro_batch_size, args.seq_length, args.output_json)
