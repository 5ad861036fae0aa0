"""HuggingFace LLaMA folder -> Megatron-Core checkpoint that the recipes ``--load``.

    python -m converters.hf_to_megatron --input-model-dir ./llama-2-7b-hf \\
        --output-model-dir ./llama2-7b-tp8pp1 --tensor-model-parallel-size 8 \\
        --pipeline-model-parallel-size 1 --type 7B [--merge-mlp] \\
        [--make-vocab-size-divisible-by 128] [--num_heads 64 --num_kv_heads 8 --hidden_size 8192 --num_layers 80]

The output is ``<dir>/release`` in dist_checkpointing's torch_dist format plus the tracker
file; it loads at the TP/PP given here and at any other that divides heads, kv groups and
layers (megatron reshards on load).  ``--merge-mlp`` is accepted for AscendSpeed's scripts:
Megatron-Core always keeps gate and up merged in ``linear_fc1`` ([gate_r ; up_r] per rank).
"""

from __future__ import annotations


import time

from recipes.data.tokenizer import add_tokenizer_flags
from recipes.errors import ArgumentParser
from recipes.model import flags
from converters import cli
from converters.sources import HFSource
from converters.writers import write_dist


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_folder_flags(p)
    flags.add_layout_flags(p, "the layout written; default 1 (an HF folder has none)")
    flags.add_vocab_padding_flag(p)
    p.add_argument("--merge-mlp", action="store_true", help="accepted; Megatron-Core's linear_fc1 is always merged")
    add_tokenizer_flags(p, "the input folder when it holds one (recorded for later commands)", typed=False)
    cli.add_shape_flags(p)
    flags.add_dtype_flag(p, "the input's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    src = HFSource(args.input_model_dir, cli.overrides(args))
    cli.check_type(args, src.shape, f"{args.input_model_dir}/config.json")
    if args.tokenizer_name_or_path:
        src.meta["tokenizer_name_or_path"] = args.tokenizer_name_or_path
    model = cli.TYPES.get(args.type, args.type) if args.type else None
    tp, pp = args.tensor_model_parallel_size or 1, args.pipeline_model_parallel_size or 1
    out = write_dist(src, args.output_model_dir, tp, pp, flags.vocab_divisor(args.make_vocab_size_divisible_by),
                     cli.dtype_of(args), model, {"converted_from": str(args.input_model_dir)})
    print(f"wrote {out} ({src.shape.num_layers} layers, TP={tp} PP={pp}) in {time.time() - t0:.1f} s; "
          f"peak RSS {cli.peak_rss_gib():.2f} GiB", flush=True)
    return out


if __name__ == "__main__":
    main()
