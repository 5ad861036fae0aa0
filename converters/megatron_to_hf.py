"""Megatron checkpoint (torch_dist from the recipes, or AscendSpeed's legacy per-rank layout)
-> HuggingFace folder (sharded safetensors + index + config.json) that transformers loads.

    python -m converters.megatron_to_hf --input-model-dir ./ckpt --output-model-dir ./hf-out \\
        [--max-shard-size 5GB] [--params-dtype bf16] [--type 7B | shape flags, for legacy input]

The padded vocabulary rows are trimmed back to the true vocabulary size.
"""

from __future__ import annotations


import time

from recipes.data.tokenizer import add_tokenizer_flags
from recipes.errors import ArgumentParser
from recipes.model import flags
from converters import cli
from converters.sources import open_megatron
from converters.writers import write_hf


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_folder_flags(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file written, as in HF save_pretrained")
    add_tokenizer_flags(p, "the checkpoint's (copied into the folder)", typed=False)
    p.add_argument("--hf-config", default=None, help="shape of a legacy checkpoint from an HF config folder")
    cli.add_shape_flags(p)
    flags.add_dtype_flag(p, "the input's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    src = open_megatron(args.input_model_dir, cli.legacy_shape(args), args.vocab_size)
    tok = args.tokenizer_name_or_path or src.meta.get("tokenizer_name_or_path")
    out = write_hf(src, args.output_model_dir, args.max_shard_size, cli.dtype_of(args), tok)
    print(f"wrote {out} in {time.time() - t0:.1f} s; peak RSS {cli.peak_rss_gib():.2f} GiB", flush=True)
    return out


if __name__ == "__main__":
    main()
