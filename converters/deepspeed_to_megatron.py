"""DeepSpeed checkpoint (``recipes.pretrain --deepspeed``, ZeRO 0-3) -> this project's Megatron
torch_dist checkpoint, which ``recipes.generate`` / ``evaluate`` / ``pretrain --load`` read and
``converters.megatron_to_hf`` takes on to HF.

    python -m converters.deepspeed_to_megatron --input-model-dir ./ckpt-zero3 --output-model-dir ./mg \\
        [--tag iter_0000100] [--tensor-model-parallel-size 1] [--params-dtype bf16]

The ZeRO partitions are gathered by DeepSpeed's own ``zero_to_fp32``; TP=1 checkpoints only.
"""

from __future__ import annotations


import time

from recipes.errors import ArgumentParser
from recipes.model import flags
from converters import cli
from converters.sources import DeepSpeedSource
from converters.writers import write_dist


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_folder_flags(p, "the DeepSpeed checkpoint folder (with latest_checkpointed_iteration.txt)")
    p.add_argument("--tag", default=None, help="the iteration folder (default: the latest)")
    flags.add_layout_flags(p, "the layout written (default: the source's)")
    flags.add_vocab_padding_flag(p)
    flags.add_dtype_flag(p, "the input's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    src = DeepSpeedSource(args.input_model_dir, args.tag)
    tp = args.tensor_model_parallel_size or src.args.get("tensor_model_parallel_size", 1)
    pp = args.pipeline_model_parallel_size or src.args.get("pipeline_model_parallel_size", 1)
    divisor = flags.vocab_divisor(args.make_vocab_size_divisible_by, src.args.get("make_vocab_size_divisible_by"))
    out = write_dist(src, args.output_model_dir, tp, pp, divisor, cli.dtype_of(args), src.args.get("model"),
                     {"converted_from": f"{args.input_model_dir} (DeepSpeed)"})
    print(f"wrote {out} from {args.input_model_dir} in {time.time() - t0:.1f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
