"""Flags the converters share, named as in AscendSpeed (both ``--num_heads`` and ``--num-heads``)."""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from recipes.errors import BadInput
from recipes.model import llama2

TYPES = {"7B": "llama2-7b", "13B": "llama2-13b", "34B": "llama2-34b", "70B": "llama2-70b", "tiny": "llama2-tiny"}
SHAPE_FLAGS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
               "num_kv_heads": "num_query_groups", "ffn_hidden_size": "ffn_hidden_size", "vocab_size": "vocab_size"}


def add_folder_flags(p: argparse.ArgumentParser, source: str = "the source folder") -> None:
    """--input-model-dir / --output-model-dir, with Megatron-LM's --load-dir / --save-dir names."""
    p.add_argument("--input-model-dir", "--load-dir", dest="input_model_dir", required=True,
                   help=f"{source} (Megatron-LM's --load-dir also works)")
    p.add_argument("--output-model-dir", "--save-dir", dest="output_model_dir", required=True,
                   help="a new or empty folder to write (Megatron-LM's --save-dir also works)")


def add_shape_flags(p: argparse.ArgumentParser):
    p.add_argument("--type", default=None, help=f"one of {', '.join(TYPES)} (or llama2-7b ...); "
                   "default: the shape in the HF config / checkpoint")
    for flag in SHAPE_FLAGS:
        p.add_argument("--" + flag, "--" + flag.replace("_", "-"), dest=flag, type=int, default=None,
                       help=f"the model's {flag.replace('_', ' ')}, checked against the input "
                            "(default: read from the input)")


def dtype_of(args) -> Optional[torch.dtype]:
    return llama2.DTYPES[args.params_dtype] if args.params_dtype else None


def type_shape(args) -> Optional[llama2.LlamaShape]:
    if not args.type:
        return None
    return llama2.shape(TYPES.get(args.type, args.type))


def overrides(args) -> dict:
    return {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items() if getattr(args, flag) is not None}


def check_type(args, shape: llama2.LlamaShape, where: str):
    """--type against the shape the input declares: a mismatch is the user's mistake, said plainly."""
    expected = type_shape(args)
    if expected is None:
        return
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        if field in overrides(args):
            continue
        if getattr(expected, field) != getattr(shape, field):
            raise BadInput(f"--type {args.type}: {field} {getattr(expected, field)} but {where} has "
                             f"{getattr(shape, field)}")


def peak_rss_gib() -> float:
    """This process's resident-set high-water mark (Linux VmHWM; resets at exec, unlike
    getrusage's, so a forked launcher's memory does not count); 0 where unavailable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def legacy_shape(args):
    """The shape of a legacy checkpoint, which records none: --hf-config, else --type, then flags."""
    import json
    from pathlib import Path

    from dataclasses import replace

    shape = None
    if args.hf_config:
        shape = llama2.LlamaShape.from_hf_config(json.loads((Path(args.hf_config) / "config.json").read_text()))
    shape = shape or type_shape(args)
    return None if shape is None else replace(shape, **overrides(args))
