"""The pretrain loop's step (``recipes.train.training.train_step``) at the CPU-sized LLaMA-2 shape
with gradient accumulation fusion + compiled CPU ops ("fused") and without ("plain"),
alternated step by step in one process on one model.  This machine's speed drifts by up to
2x within a minute, so separate runs (``bench_pretrain.py --variants``) cannot resolve a
5 % difference; alternating pairs can.

    OMP_NUM_THREADS=2 python bench/bench_fused_loop.py [--dtype bf16|fp32] [--pairs 8] [--micro-batches 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ascend_patches  # noqa: E402
from recipes.model import llama2, parallel  # noqa: E402
from recipes.train import training


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=1, help="per step, micro-batch 2 each")
    args = p.parse_args()
    bf16 = args.dtype == "bf16"
    parallel.init_distributed()
    ascend_patches.keep_freed_memory()
    shape = llama2.LlamaShape(8, 1024, 2816, 16, 16, vocab_size=32000, seq_length=512)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = llama2.build_model(shape, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
                               gradient_accumulation_fusion=True)
    model = training.wrap_ddp(training.wrap_float16(model))
    optimizer = training.build_optimizer([model], lr=1e-4, bf16=bf16)
    training.attach_grad_sync([model], optimizer)
    linears = [m for m in model.modules() if hasattr(m, "gradient_accumulation_fusion")]
    embeddings = [m for m in model.modules() if hasattr(m, "_ap_accumulate_in_main_grad")]

    def use_fused(on: bool):
        ascend_patches.configure(compile_ops=on)
        for m in linears:
            m.gradient_accumulation_fusion = on
        for m in embeddings:
            m._ap_accumulate_in_main_grad = on

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.micro_batches):
        t = torch.randint(0, 32000, (2, 513), generator=g)
        batches.append({"tokens": t[:, :-1], "labels": t[:, 1:]})

    def step():
        t0 = time.perf_counter()
        training.train_step([model], optimizer, iter(batches), len(batches), 512, 2)
        return time.perf_counter() - t0

    use_fused(True)
    print(f"{args.dtype}: first fused step (compiles) {step():.1f} s", flush=True)
    use_fused(False)
    step()
    times = {True: [], False: []}
    for _ in range(args.pairs):
        for on in (False, True):
            use_fused(on)
            times[on].append(step())
    ratios = [f / p for f, p in zip(times[True], times[False])]
    print(f"{args.dtype}, {args.micro_batches} micro-batch(es) of 2 x 512 per step, {args.pairs} alternating pairs:")
    print(f"  plain {statistics.median(times[False]):.3f} s, fused {statistics.median(times[True]):.3f} s (medians)")
    print(f"  fused / plain per pair: median {statistics.median(ratios):.3f}, "
          f"{sum(r < 1 for r in ratios)}/{len(ratios)} pairs faster, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
