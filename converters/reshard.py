"""Change a Megatron checkpoint's tensor/pipeline parallel sizes, and carry AscendSpeed's legacy
per-rank checkpoints (``mp_rank_XX[_YYY]/model_optim_rng.pt``) over to torch_dist.

    python -m converters.reshard --input-model-dir ./load_ckpt --output-model-dir ./tp8pp1 \\
        --src-tensor-model-parallel-size 8 --src-pipeline-model-parallel-size 8 \\
        --tgt-tensor-model-parallel-size 8 --tgt-pipeline-model-parallel-size 1 \\
        [--type 7B | --hf-config DIR | shape flags]   (legacy input records no shape)

The source sizes are checked against what the input holds (legacy: its mp_rank folders;
torch_dist: its args.json).  The output is torch_dist, which megatron also reshards on load;
the target sizes set the vocabulary padding and are recorded for later commands.
"""

from __future__ import annotations

from recipes.data.tokenizer import add_tokenizer_flags
from recipes.errors import ArgumentParser, BadInput
from recipes.model import flags

from converters import cli
from converters.sources import DistSource, LegacySource, open_megatron
from converters.writers import write_dist


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_folder_flags(p)
    flags.add_layout_flags(p, "the source's, checked (default: read from it)", prefix="src")
    flags.add_layout_flags(p, "the new layout (default: the source's)", prefix="tgt")
    flags.add_vocab_padding_flag(p)
    p.add_argument("--hf-config", default=None, help="an HF config.json folder giving the shape of a checkpoint that records none")
    add_tokenizer_flags(p, "the source's (recorded in the output)", typed=False)
    cli.add_shape_flags(p)
    flags.add_dtype_flag(p, "the input's")
    return p


def source_sizes(src):
    if isinstance(src, LegacySource):
        return src.tp, src.pp
    return src.args.get("tensor_model_parallel_size", 1), src.args.get("pipeline_model_parallel_size", 1)


def main(argv=None):
    args = build_parser().parse_args(argv)
    src = open_megatron(args.input_model_dir, cli.legacy_shape(args), args.vocab_size)
    tp, pp = source_sizes(src)
    for flag, given, actual in (("--src-tensor-model-parallel-size", args.src_tensor_model_parallel_size, tp),
                                ("--src-pipeline-model-parallel-size", args.src_pipeline_model_parallel_size, pp)):
        if given is not None and given != actual:
            raise BadInput(f"{flag} {given}, but {args.input_model_dir} was written with {actual}")
    tgt_tp = args.tgt_tensor_model_parallel_size or tp
    tgt_pp = args.tgt_pipeline_model_parallel_size or pp
    divisible = flags.vocab_divisor(args.make_vocab_size_divisible_by,
                                    src.args.get("make_vocab_size_divisible_by") if isinstance(src, DistSource) else None)
    if args.tokenizer_name_or_path:
        src.meta["tokenizer_name_or_path"] = args.tokenizer_name_or_path
    model = cli.TYPES.get(args.type, args.type) if args.type else (
        src.args.get("model") if isinstance(src, DistSource) else None)
    out = write_dist(src, args.output_model_dir, tgt_tp, tgt_pp, divisible, cli.dtype_of(args), model,
                     {"converted_from": str(args.input_model_dir)}, flag_prefix="tgt-")
    print(f"wrote {out}: TP {tp}->{tgt_tp}, PP {pp}->{tgt_pp}", flush=True)
    return out


if __name__ == "__main__":
    main()
