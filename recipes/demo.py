"""The README's main job, on the CPU default: a tiny LLaMA-2 on stock megatron-core with
ascend_patches, trained for a few steps with tensor parallelism over 2 processes.

    torchrun --nproc-per-node 2 -m recipes.demo [--steps 40] [--tensor-model-parallel-size 2]

The data is a deterministic token stream with structure a model can learn (short
arithmetic progressions), so the loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.distributed as dist

import ascend_patches
from recipes import llama2, parallel, throughput, training


def progression_batches(micro_batch_size: int, seq: int, vocab: int, seed: int = 0):
    """Each row counts up from a random start with a random stride, modulo the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (micro_batch_size, 1), generator=g)
        stride = torch.randint(1, 8, (micro_batch_size, 1), generator=g)
        rows = (start + stride * torch.arange(seq + 1)) % vocab
        yield {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-tiny", choices=list(llama2.SIZES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-interval", type=int, default=5)
    args = p.parse_args(argv)

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    parallel.init_distributed(tp=tp, pp=pp)
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    dp = ps.get_data_parallel_world_size()
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    nmb = args.global_batch_size // (args.micro_batch_size * dp)
    shape = llama2.shape(args.model)
    config = llama2.transformer_config(shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       pipeline_dtype=torch.float32)
    model = llama2.build_model(shape, config=config, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage())
    model = training.wrap_ddp(model)
    optimizer = training.build_optimizer([model], lr=args.lr)
    training.attach_grad_sync([model], optimizer)

    if rank == 0:
        print(ascend_patches.report(), flush=True)
        print(f"\nmodel {args.model}: {llama2.count_parameters_across_tp(model):,} parameters, "
              f"TP={tp} PP={pp} DP={dp}, {nmb} micro-batches of {args.micro_batch_size} x {args.seq_length} tokens",
              flush=True)
    peak, peak_src = throughput.peak_tflops(ascend_patches.settings().backend, torch.float32)
    meter = throughput.Meter(throughput.train_flops_per_token(shape, args.seq_length, shape.vocab_size),
                             peak, dist.get_world_size())
    data = progression_batches(args.micro_batch_size, args.seq_length, shape.vocab_size,
                               seed=ps.get_data_parallel_rank())
    first = last = None
    for step in range(1, args.steps + 1):
        loss, grad_norm = training.train_step([model], optimizer, data, nmb, args.seq_length, args.micro_batch_size)
        m = meter.step(args.global_batch_size * args.seq_length)
        if loss is not None:
            first = first if first is not None else loss
            last = loss
        if rank == dist.get_world_size() - 1 and (step % args.log_interval == 0 or step == 1):
            print(f"step {step:4d} | loss {loss:.4f} | grad norm {grad_norm:.3f} | "
                  f"{m['tokens_per_s_per_device']:,.0f} tokens/s/device | {m['tflops_per_device'] * 1e3:.2f} GFLOP/s/device | "
                  f"MFU {m['mfu'] * 100:.2f}% (peak: {peak_src})", flush=True)
    if rank == dist.get_world_size() - 1:
        verdict = "fell" if last < first else "DID NOT FALL"
        print(f"\nloss {first:.4f} -> {last:.4f}: {verdict}", flush=True)
    parallel.destroy()
    if last is not None and not last < first:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
