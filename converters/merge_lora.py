"""Fold a LoRA checkpoint (``recipes.pretrain --lora-*``) into its base model.

    python -m converters.merge_lora --base ./llama2-7b-tp8pp1 --lora ./ckpt-lora \\
        --output-model-dir ./llama2-7b-merged [--to-hf] [--tensor-model-parallel-size 8]

Writes a Megatron (torch_dist) checkpoint, or with ``--to-hf`` an HF folder.  The adapters'
per-rank pieces are put back into Megatron-Core's global layout (B of linear_qkv / linear_fc1
split by rows like the weight, A of linear_proj / linear_fc2 by columns), so each weight
becomes W + alpha/r * B @ A, one tensor at a time, at any output TP/PP.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from recipes.errors import ArgumentParser
from converters.layout import tp_merge
from converters.sources import ConversionError, open_megatron
from converters.writers import write_dist, write_hf
from recipes.model import flags, llama2

COLUMN = {"linear_qkv", "linear_fc1"}
SAVED = {"embedding.word_embeddings.weight": "embedding", "output_layer.weight": "output"}


def read_lora(folder) -> Tuple[dict, Dict[Tuple[str, int], torch.Tensor], Dict[str, torch.Tensor]]:
    """(config, {(canonical name, layer): global delta}, {canonical name: full saved module weight})."""
    from recipes.model import lora

    cfg, it_dir, per_rank = lora.read_adapters(folder)
    tp = cfg["tensor_model_parallel_size"]
    scaling = cfg["alpha"] / cfg["r"]
    deltas, saved = {}, {}
    for name, pieces in per_rank.items():
        if name in SAVED:
            saved[SAVED[name]] = tp_merge("embedding", [pieces[t] for t in range(tp)])
            continue
        parsed = lora.parse_adapter_name(name)
        if parsed is None:
            raise ConversionError(f"{it_dir}: unexpected adapter tensor {name}")
        layer, linear, which = parsed
        if which == "B":
            continue
        a_pieces = [pieces[t] for t in range(tp)]
        b_pieces = [per_rank[name[:-1] + "B"][t] for t in range(tp)]
        canon = lora.CANONICAL[linear]
        where = f"{it_dir}: {name[:-7]} "
        if linear in COLUMN:
            a = tp_merge("input_norm", a_pieces, where)  # replicated: must agree across TP ranks
            b = tp_merge(canon, b_pieces, where)
        else:
            a = torch.cat(a_pieces, dim=1)
            b = tp_merge("input_norm", b_pieces, where)
        deltas[(canon, layer)] = (b.double() @ a.double()) * scaling
    return cfg, deltas, saved


class MergedSource:
    """A reader whose tensors are the base's with the adapters folded in."""

    def __init__(self, base, deltas, saved):
        self.base, self.deltas, self.saved = base, deltas, saved
        self.shape, self.dtype, self.padded_vocab, self.meta = base.shape, base.dtype, base.padded_vocab, base.meta

    def get(self, name, layer=None):
        if name in self.saved:
            return self.saved[name]
        w = self.base.get(name, layer)
        d = self.deltas.get((name, layer))
        if d is None:
            return w
        if d.shape != w.shape:
            raise ConversionError(f"adapter for {name} layer {layer}: delta {tuple(d.shape)} vs weight {tuple(w.shape)}")
        return (w.double() + d).to(w.dtype)

    def close(self):
        self.base.close()


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base Megatron checkpoint the LoRA was trained on")
    p.add_argument("--lora", required=True, help="the LoRA checkpoint folder (recipes.pretrain --save with --lora-target-modules)")
    p.add_argument("--output-model-dir", required=True, help="a new or empty folder to write")
    p.add_argument("--to-hf", action="store_true", help="write an HF folder instead of a Megatron checkpoint")
    flags.add_layout_flags(p, "the layout written (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file written, as in HF save_pretrained")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    base = open_megatron(args.base)
    b_args = getattr(base, "args", {})
    tp = args.tensor_model_parallel_size or b_args.get("tensor_model_parallel_size", 1)
    pp = args.pipeline_model_parallel_size or b_args.get("pipeline_model_parallel_size", 1)
    divisible = flags.vocab_divisor(None, b_args.get("make_vocab_size_divisible_by"))
    if not args.to_hf:  # before reading any adapter: a layout that cannot be written is refused at once
        llama2.check_layout(base.shape, tp, pp, padded_vocab=llama2.padded_vocab_size(base.shape.vocab_size,
                                                                                      divisible, tp))
    cfg, deltas, saved = read_lora(args.lora)
    layers = {layer for _, layer in deltas}
    if layers and max(layers) >= base.shape.num_layers:
        raise ConversionError(f"--lora {args.lora} adapts layer {max(layers)}, the base has {base.shape.num_layers}")
    src = MergedSource(base, deltas, saved)
    if args.to_hf:
        out = write_hf(src, args.output_model_dir, args.max_shard_size, None, base.meta.get("tokenizer_name_or_path"))
    else:
        out = write_dist(src, args.output_model_dir, tp, pp, divisible, None, b_args.get("model"),
                         {"merged_lora": str(args.lora), "merged_base": str(args.base)})
    print(f"merged {len(deltas)} adapters (r={cfg['r']}, alpha={cfg['alpha']}) into {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
