"""Where the built-in engine's tensors live after one training step, against the device the
backend in force names (``ascend_patches.device()``): every parameter, its ``main_grad`` (the
DDP bucket), and every optimizer state tensor.  Prints one line per kind and exits 1 if any
tensor is elsewhere.  Run by ``bench/accelerator_check.sh`` on an accelerator; on the CPU
backend (and the CPU-backed emulated NPU) every tensor is on the CPU, so it shows nothing there.

    python bench/placement_check.py --data-path PREFIX --tokenizer-name-or-path TOK
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import ascend_patches
from recipes.model import checkpointing
from recipes.train import pretrain, run_settings
from recipes.train.trainer import Trainer


def tensors(trainer):
    """(kind, name, tensor) of the model state after a step."""
    for chunk in trainer.models:
        for name, p in checkpointing.unwrap(chunk).named_parameters():
            yield "parameter", name, p
            if getattr(p, "main_grad", None) is not None:
                yield "main_grad", name, p.main_grad
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)
        for i, state in enumerate(inner.state.values()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield "optimizer state", f"{i}.{key}", value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer-name-or-path", required=True)
    a = p.parse_args(argv)
    args = pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", a.data_path,
                                               "--tokenizer-name-or-path", a.tokenizer_name_or_path,
                                               "--train-iters", "1", "--seq-length", "64"])
    trainer = Trainer(run_settings.resolve(args, world=1))
    trainer.setup()
    trainer.resume()
    trainer.train()
    want = ascend_patches.device().type
    where = collections.defaultdict(collections.Counter)
    wrong = []
    for kind, name, t in tensors(trainer):
        where[kind][t.device.type] += 1
        if t.device.type != want:
            wrong.append(f"{kind} {name} on {t.device}")
    for kind, counts in where.items():
        print(f"{kind}: {dict(counts)} (the backend's device: {want})")
    print("placement: " + ("every tensor on " + want if not wrong else f"{len(wrong)} elsewhere, e.g. {wrong[:3]}"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
