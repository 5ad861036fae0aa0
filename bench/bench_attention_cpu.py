"""Causal attention on the CPU, forward + backward (training) and forward alone under
no_grad (scoring, prefill): the blocked GEMM path against torch's fused CPU flash kernel
(``scaled_dot_product_attention``), over sequence lengths and head widths, alternated per
shape.  It is where ``flash_attention``'s CPU bounds come from.

    OMP_NUM_THREADS=2 python bench/bench_attention_cpu.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ascend_patches.ops import flash_attention as fa

# (seq, batch, heads, kv heads, head dim): the CPU recipe shape (512 x 2, 16 x 64), LLaMA-2's
# head width 128 with and without GQA, the tiny test model, and both sides of each bound
SHAPES = [(128, 4, 8, 4, 8), (512, 2, 64, 64, 16), (512, 2, 32, 32, 32), (512, 1, 8, 8, 32), (512, 1, 8, 8, 64),
          (512, 1, 16, 16, 64), (512, 1, 8, 8, 128), (300, 1, 8, 8, 64), (300, 2, 8, 8, 64), (128, 8, 16, 16, 64),
          (384, 2, 16, 16, 64), (512, 2, 16, 16, 64), (768, 1, 16, 16, 64), (1024, 1, 16, 16, 64),
          (2048, 1, 16, 16, 64), (256, 2, 32, 32, 128), (512, 1, 32, 32, 128), (1024, 1, 64, 8, 128)]


def fwd_bwd(fn, q, k, v):
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))


def fwd(fn, q, k, v):
    with torch.no_grad():
        fn(q, k, v)


def alternated(fns, run, reps, *inputs):
    """Median seconds per function, the functions alternated in each round."""
    times = {name: [] for name in fns}
    for r in range(reps + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            run(fn, *inputs)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return [statistics.median(times[name]) * 1e3 for name in fns]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}; ms, median of {args.reps} alternated rounds; ratio = blocked / torch")
    print(f"  {'seq x batch, heads/kv, d':<28} {'fwd+bwd torch':>14} {'blocked':>9} {'ratio':>6}"
          f" {'fwd torch':>10} {'blocked':>9} {'ratio':>6}  blocked used")
    for s, b, n, ng, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(s, b, n, d, generator=g, requires_grad=True)
        k, v = (torch.randn(s, b, ng, d, generator=g, requires_grad=True) for _ in range(2))
        scale = d ** -0.5
        fns = {"sdpa": lambda q, k, v: fa.attention_sdpa(q, k, v, True, None, scale, 0.0),
               "blocked": lambda q, k, v: fa.attention_blocked(q, k, v, scale)}
        ts, tb = alternated(fns, fwd_bwd, args.reps, q, k, v)
        fs, fb = alternated(fns, fwd, args.reps, q, k, v)
        used = fa.blocked_applies(q, k, True, None, 0.0)
        print(f"  {f'{s} x {b}, {n}/{ng}, {d}':<28} {ts:14.1f} {tb:9.1f} {tb / ts:6.2f} {fs:10.1f} {fb:9.1f}"
              f" {fb / fs:6.2f}  {'yes' if used else 'no'}", flush=True)


if __name__ == "__main__":
    main()
