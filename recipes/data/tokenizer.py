"""Tokenizers the recipes accept: a HuggingFace folder (``PretrainedFromHF``, via
transformers) or a raw sentencepiece ``tokenizer.model`` (``SentencePiece``).

Both are seen through one small interface: ``encode`` (no BOS/EOS added), ``encode_batch``
(many texts in one call into the tokenizer's native code), ``decode``, ``bos_id``, ``eos_id``,
``vocab_size``.  Megatron-LM's names are accepted too: ``--tokenizer-type Llama2Tokenizer``
or ``SentencePieceTokenizer`` (a sentencepiece model) and ``HuggingFaceTokenizer`` (an HF
folder), with the path in ``--tokenizer-model``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TOKENIZER_TYPES = ("PretrainedFromHF", "SentencePiece")
# Megatron-LM's --tokenizer-type values for the same two kinds
MEGATRON_LM_TYPES = {"Llama2Tokenizer": "SentencePiece", "SentencePieceTokenizer": "SentencePiece",
                     "GPTSentencePieceTokenizer": "SentencePiece", "HuggingFaceTokenizer": "PretrainedFromHF"}


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str):
        return self.sp.encode(text)

    def encode_batch(self, texts, threads: int = -1):
        return self.sp.encode(list(texts), num_threads=threads)

    def decode(self, ids):
        return self.sp.decode(list(ids))


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.model_max_length = 1 << 60  # callers truncate to the model they run; no length warning
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts, threads: int = -1):
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(list(ids))


class _OnePath(argparse.Action):
    """--tokenizer-name-or-path and Megatron-LM's --tokenizer-model name one path: given both,
    they must agree (the later one is never taken silently)."""

    def __call__(self, parser, namespace, value, option_string=None):
        before = getattr(namespace, self.dest)
        if before is not None and before != value:
            parser.error(f"{option_string} {value} and an earlier tokenizer path {before} disagree: give one")
        setattr(namespace, self.dest, value)


def add_tokenizer_flags(p, unset: str, typed: bool = True) -> None:
    """The tokenizer flags every command that reads or records one takes: the path (Megatron-LM's
    --tokenizer-model is the same flag) and, where the command loads it, --tokenizer-type."""
    p.add_argument("--tokenizer-name-or-path", "--tokenizer-model", dest="tokenizer_name_or_path", default=None,
                   action=_OnePath, help=f"an HF tokenizer folder or a sentencepiece .model (Megatron-LM's "
                                         f"--tokenizer-model also works); default: {unset}")
    if typed:
        p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + tuple(MEGATRON_LM_TYPES), default=None,
                       help="default: a folder with tokenizer.json/config is PretrainedFromHF, a .model file "
                            "SentencePiece")


def kind(tokenizer_type):
    """This project's name for a --tokenizer-type (Megatron-LM's names map onto the two kinds)."""
    return MEGATRON_LM_TYPES.get(tokenizer_type, tokenizer_type)


def load_tokenizer(path: str, tokenizer_type: str = None):
    """Load a tokenizer; a missing path is a clear error before any work."""
    from recipes.errors import BadInput, MissingInput

    p = Path(path)
    if not p.exists():
        raise MissingInput(f"tokenizer not found: {path}")
    tokenizer_type = kind(tokenizer_type)
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise BadInput(f"--tokenizer-type {tokenizer_type!r}: expected one of "
                       f"{', '.join(TOKENIZER_TYPES + tuple(MEGATRON_LM_TYPES))}")
    if p.is_file():
        if tokenizer_type == "PretrainedFromHF":
            raise BadInput(f"--tokenizer-type PretrainedFromHF (HuggingFaceTokenizer) needs a folder, got the file {path}")
        return SentencePieceTokenizer(p)
    if tokenizer_type == "SentencePiece":
        model = p / "tokenizer.model"
        if not model.is_file():
            raise MissingInput(f"no tokenizer.model in {path}")
        return SentencePieceTokenizer(model)
    has_hf = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_hf:
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise MissingInput(f"{path} holds no tokenizer.json, tokenizer_config.json or tokenizer.model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return HFTokenizer(str(p))
