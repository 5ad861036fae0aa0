"""GEMM rate of this CPU, fp32 and bf16, at a square size and at the layouts a CPU-sized
LLaMA-2 training step uses (forward x W^T, dgrad g W, wgrad g^T x, the vocab-wide logits):
the ceiling that CPU-MFU is measured against, and how far below it the model's own GEMMs sit.

    OMP_NUM_THREADS=2 python bench/bench_gemm_shapes.py
"""

import time

import torch


def rate(a, b, reps=10):
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / ((time.perf_counter() - t) / reps) / 1e9


def main():
    tokens, h, f2, vocab = 1024, 1024, 5632, 32000
    for dt in (torch.float32, torch.bfloat16):
        x, w, g = torch.randn(tokens, h, dtype=dt), torch.randn(f2, h, dtype=dt), torch.randn(tokens, f2, dtype=dt)
        sq = torch.randn(2048, 2048, dtype=dt)
        rows = {"square 2048": rate(sq, sq), "forward x@W^T": rate(x, w.t()), "dgrad g@W": rate(g, w),
                "wgrad g^T@x": rate(g.t(), x), "logits x@E^T": rate(x, torch.randn(vocab, h, dtype=dt).t(), 3)}
        print(f"{str(dt).replace('torch.', ''):>9}: " + ", ".join(f"{k} {v:,.0f}" for k, v in rows.items()) + " GFLOP/s")


if __name__ == "__main__":
    main()
