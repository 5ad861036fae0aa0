"""Preprocessing throughput (1 vs 2 workers) and the pretrain recipe's own step time and
CPU-MFU (achieved model FLOP/s over this machine's measured GEMM FLOP/s in the same dtype,
measured by the recipe before each step; medians over the run) for the CPU-sized LLaMA-2
shape, fp32 and bf16, at global batch 2 and 8 (micro-batch 2).

    python bench/bench_pretrain.py [--tokenizer ../shared/fixtures/tokenizer/tokenizer.model] [--global-batch-sizes 2,8]
        [--variants fused,plain]

"fused" is the recipe as the bench runs it (gradient accumulation fusion, --compile-fused-ops);
"plain" turns both off, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_SHAPE = ["--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
             "--num-attention-heads", "16", "--seq-length", "512", "--max-position-embeddings", "512"]


def bench_preprocess(tok: str, work: Path, copies: int):
    rows = json.loads((ROOT / "recipes" / "demo_data" / "alpaca_data_sample.json").read_text())
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for c in range(copies):
            for r in rows:
                f.write(json.dumps({"text": f"{r['instruction']}\n{r['input']}\n{r['output']}"}) + "\n")
    from recipes.data import preprocess_data

    results = {}
    for workers in (1, 2):
        args = preprocess_data.build_parser().parse_args([
            "--input", str(corpus), "--tokenizer-name-or-path", tok, "--output-prefix", str(work / f"w{workers}"),
            "--workers", str(workers), "--append-eod", "--log-interval", "10000000", "--chunk-size", "256"])
        results[workers] = preprocess_data.preprocess(args)
    return results, str(work / "w1_text_document")


VARIANTS = {
    # what the recipe runs for this bench: megatron's gradient accumulation fusion (on by
    # default) and the compiled CPU kernels for RMSNorm, SwiGLU and RoPE
    "fused": ["--compile-fused-ops"],
    # the same loop with both off, for the side-by-side ratio
    "plain": ["--no-gradient-accumulation-fusion"],
}


def bench_train(data: str, tok: str, dtype: str, iters: int, work: Path, gbs: int, variant: str = "fused"):
    metrics = work / f"m_{dtype}_{gbs}_{variant}.jsonl"
    cmd = [sys.executable, "-m", "recipes.pretrain", *CPU_SHAPE, "--data-path", data, "--tokenizer-name-or-path", tok,
           "--micro-batch-size", "2", "--global-batch-size", str(gbs), "--train-iters", str(iters), "--lr", "1e-4",
           "--metrics-file", str(metrics), "--log-interval", "1", "--split", "100,0,0", "--measure-peak-every", "1"]
    cmd += ["--bf16"] if dtype == "bf16" else ["--fp32"]
    cmd += VARIANTS[variant]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    recs = [json.loads(l) for l in open(metrics)][1:]  # the first step warms up
    out = {k: statistics.median(r[k] for r in recs) for k in ("step_time_s", "tokens_per_s_per_device",
                                                              "tflops_per_device", "peak_tflops")}
    # this shared machine's GEMM rate swings 2x from second to second (bf16 most), so one step
    # against the probe before it is noise; the medians over the run are compared instead
    out["mfu"] = out["tflops_per_device"] / out["peak_tflops"]
    out["peak_range"] = (min(r["peak_tflops"] for r in recs), max(r["peak_tflops"] for r in recs))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "fixtures" / "tokenizer" / "tokenizer.model"))
    p.add_argument("--copies", type=int, default=24, help="copies of the Alpaca sample in the corpus")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--global-batch-sizes", default="2,8", help="micro-batch 2; 8 = 4 accumulated micro-batches")
    p.add_argument("--variants", default="fused", help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        pre, data = bench_preprocess(args.tokenizer, work, args.copies)
        print(f"preprocessing {pre[1]['rows_read']} docs, {pre[1]['tokens_written']:,} tokens (LLaMA-2 tokenizer):")
        for w, s in pre.items():
            print(f"  workers={w}: {s['docs_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s")
        print(f"  ratio 2 workers / 1 = {pre[2]['tokens_per_s'] / pre[1]['tokens_per_s']:.2f}x")
        print("pretrain recipe, CPU-sized LLaMA-2 (8 x 1024, ffn 2816, 16 heads, vocab 32000, seq 512, micro-batch "
              "2), median over iterations after the first; CPU-MFU is against the GEMM rate the "
              "recipe measured before each step (--measure-peak-every 1), medians over the run:")
        for gbs in (int(x) for x in args.global_batch_sizes.split(",")):
            for dtype in ("fp32", "bf16"):
                for variant in args.variants.split(","):
                    r = bench_train(data, args.tokenizer, dtype, args.iters, work, gbs, variant)
                    print(f"  {dtype}, global batch {gbs}, {variant}: {r['step_time_s']:.2f} s/step, "
                          f"{r['tokens_per_s_per_device']:,.0f} tokens/s, {r['tflops_per_device'] * 1e3:.1f} GFLOP/s, "
                          f"CPU-MFU {100 * r['mfu']:.1f}% (of measured {dtype} GEMM, median "
                          f"{r['peak_tflops'] * 1e3:.0f} GFLOP/s, range {r['peak_range'][0] * 1e3:.0f}-"
                          f"{r['peak_range'][1] * 1e3:.0f})", flush=True)


if __name__ == "__main__":
    main()
