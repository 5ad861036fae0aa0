"""GEMM rate of this CPU, fp32 and bf16, at a square size and at the layouts a CPU-sized
LLaMA-2 training step uses (forward x W^T, dgrad g W, wgrad g^T x, the vocab-wide logits):
the ceiling that CPU-MFU is measured against, and how far below it the model's own GEMMs sit.

``--onednn`` instead: the step's 15 fp32 GEMMs (QKV, output, fc1, fc2, logits x forward, dgrad,
wgrad) through torch's MKL GEMM and through the two ways torch exposes oneDNN's (mkldnn-layout
tensors with weights packed once and activation conversions counted; ``_linear_pointwise`` on
dense tensors), alternated call by call and their outputs checked against MKL's: whether a faster fp32 GEMM than torch's default exists here.

    OMP_NUM_THREADS=2 python bench/bench_gemm_shapes.py [--onednn]
"""

import argparse
import time

import torch

TOKENS, HIDDEN, FFN2, VOCAB = 1024, 1024, 5632, 32000


def seconds(fn, reps=8):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def alternated(fns, reps=8):
    """Mean seconds of each fn, timed in turn within every repetition (one warm-up call each), so
    drift in this machine's speed hits every implementation alike."""
    for fn in fns:
        fn()
    total = [0.0] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            total[i] += time.perf_counter() - t
    return [t / reps for t in total]


def check_same(name, layout, k, outs):
    """The three implementations must compute the same product: fp32 sums of k products in
    another order differ by about sqrt(k) roundings of the entries' size (~sqrt(k) for unit
    normal operands), so the bound is 1e-5 * k absolute, with 1e-4 relative."""
    ref = outs[0]
    for label, out in zip(("mkldnn tensors", "_linear_pointwise"), outs[1:]):
        err = (out - ref).abs().max().item()
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * k):
            raise SystemExit(f"{name} {layout}: oneDNN ({label}) differs from MKL by {err:.3g}; not timing it")


def rate(a, b, reps=10):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds(lambda: a @ b, reps) / 1e9


def rates():
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(TOKENS, HIDDEN, dtype=dt), torch.randn(FFN2, HIDDEN, dtype=dt)
        g = torch.randn(TOKENS, FFN2, dtype=dt)
        sq = torch.randn(2048, 2048, dtype=dt)
        rows = {"square 2048": rate(sq, sq), "forward x@W^T": rate(x, w.t()), "dgrad g@W": rate(g, w),
                "wgrad g^T@x": rate(g.t(), x),
                "logits x@E^T": rate(x, torch.randn(VOCAB, HIDDEN, dtype=dt).t(), 3)}
        print(f"{str(dt).replace('torch.', ''):>9}: " + ", ".join(f"{k} {v:,.0f}" for k, v in rows.items()) + " GFLOP/s")


def onednn():
    linear, pointwise = torch._C._nn.mkldnn_linear, torch.ops.mkldnn._linear_pointwise
    shapes = {"qkv": (HIDDEN, 3 * HIDDEN), "output": (HIDDEN, HIDDEN), "fc1": (HIDDEN, FFN2),
              "fc2": (FFN2 // 2, HIDDEN), "logits": (HIDDEN, VOCAB)}
    total = {"mkl": 0.0, "mkldnn tensors": 0.0, "_linear_pointwise": 0.0}
    print("fp32 GFLOP/s: MKL | oneDNN, mkldnn tensors | oneDNN, _linear_pointwise")
    for name, (k, n) in shapes.items():
        x, w, g = torch.randn(TOKENS, k), torch.randn(n, k), torch.randn(TOKENS, n)
        w_packed, wt_packed = w.to_mkldnn(), w.t().contiguous().to_mkldnn()  # once per optimizer step
        wt, gt, xt = w.t(), g.t(), x.t()
        layouts = {
            "forward": (lambda: torch.mm(x, w.t()), lambda: linear(x.to_mkldnn(), w_packed, None).to_dense(),
                        lambda: pointwise(x, w, None, "none", [], "")),
            "dgrad": (lambda: torch.mm(g, w), lambda: linear(g.to_mkldnn(), wt_packed, None).to_dense(),
                      lambda: pointwise(g, wt, None, "none", [], "")),
            "wgrad": (lambda: torch.mm(g.t(), x),
                      lambda: linear(gt.contiguous().to_mkldnn(), xt.contiguous().to_mkldnn(), None).to_dense(),
                      lambda: pointwise(gt, xt, None, "none", [], "")),
        }
        gflop = 2 * TOKENS * k * n / 1e9
        for layout, fns in layouts.items():
            check_same(name, layout, {"forward": k, "dgrad": n, "wgrad": TOKENS}[layout], [fn() for fn in fns])
            ts = alternated(fns)
            for key, t in zip(total, ts):
                total[key] += t
            print(f"  {name:>6} {layout:<7} " + " | ".join(f"{gflop / t:6.0f}" for t in ts), flush=True)
    print("over the 15 GEMMs, time / MKL's: " + ", ".join(f"{k} {v / total['mkl']:.3f}" for k, v in total.items()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--onednn", action="store_true", help="instead, the step's 15 fp32 GEMMs, MKL vs oneDNN")
    args = p.parse_args()
    onednn() if args.onednn else rates()


if __name__ == "__main__":
    main()
