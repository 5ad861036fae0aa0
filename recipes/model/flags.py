"""The flag groups every command that names a model's layout, vocabulary padding, dtype or
checkpoint shares, declared once so a flag reads and defaults the same in pretraining,
inference and the converters.  (The tokenizer's group is ``recipes.data.tokenizer``'s, beside
the tokenizer.)

Unset, the layout and dtype flags are ``None``: each command derives them from what it has
(a size's recipe, the world size, the source checkpoint), and its help says from what.  The
vocabulary padding has one default, Megatron-LM's 128, except that a checkpoint being
continued or converted keeps the padding it was written with: its embedding rows are fixed.
"""

from __future__ import annotations

import argparse
from typing import Optional

from recipes.errors import BadInput
from recipes.model import llama2

VOCAB_DIVISOR = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def add_layout_flags(p, tp_unset: str, pp_unset: Optional[str] = None, prefix: str = "",
                     with_pp: bool = True) -> None:
    """--[prefix-]tensor-model-parallel-size and --[prefix-]pipeline-model-parallel-size (not for
    a command without pipeline stages); the help says what the command derives each from when it
    is not given."""
    lead = f"--{prefix}-" if prefix else "--"
    p.add_argument(f"{lead}tensor-model-parallel-size", type=_positive, default=None, help=f"TP; {tp_unset}")
    if with_pp:
        p.add_argument(f"{lead}pipeline-model-parallel-size", type=_positive, default=None,
                       help=f"PP; {pp_unset or tp_unset}")


def add_vocab_padding_flag(p) -> None:
    p.add_argument("--make-vocab-size-divisible-by", type=_positive, default=None,
                   help=f"pad the embedding rows to a multiple of this x TP, as Megatron-LM does (default "
                        f"{VOCAB_DIVISOR}; a checkpoint being continued or converted keeps its own)")


def vocab_divisor(given: Optional[int], recorded: Optional[int] = None) -> int:
    """The flag when given, else the divisor the source checkpoint records, else 128."""
    return given or recorded or VOCAB_DIVISOR


def checkpoint_rows(given: Optional[int], vocab: int, tp: int, rows: int, where: str) -> int:
    """The embedding rows of a run continuing a checkpoint that holds ``rows``: those rows; a
    --make-vocab-size-divisible-by that would give others is refused, not overridden."""
    if given is not None and llama2.padded_vocab_size(vocab, given, tp) != rows:
        raise BadInput(f"--make-vocab-size-divisible-by {given} pads the vocabulary {vocab} to "
                       f"{llama2.padded_vocab_size(vocab, given, tp)} rows at TP={tp}, but {where} holds {rows}: "
                       f"leave the flag out to keep the checkpoint's rows")
    return rows


def add_dtype_flag(p, unset: str) -> None:
    p.add_argument("--params-dtype", choices=list(llama2.DTYPES), default=None, help=f"default: {unset}")


def add_load_flags(p, load: str, lora_load: str, required: bool = False) -> None:
    """--load, a checkpoint folder (recipes.pretrain's or a converter's), and --lora-load, a LoRA
    checkpoint whose adapters go on top of it; the help says what the command does with each."""
    p.add_argument("--load", required=required, default=None,
                   help=f"a checkpoint folder (recipes.pretrain's, or a converter's): {load}")
    p.add_argument("--lora-load", default=None, help=f"a LoRA checkpoint (recipes.pretrain --save with "
                                                     f"--lora-target-modules) on top of --load: {lora_load}")
