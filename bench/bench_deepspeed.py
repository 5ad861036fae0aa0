"""ZeRO-0/1/2/3 under the recipe's DeepSpeed engine against the built-in loop with megatron's
distributed optimizer, DP=2 on the CPU, CPU-sized LLaMA-2 (8 x 1024, ffn 2816, 16 heads,
vocab 32000, seq 512): step time, and per rank two memory figures:

- held: the bytes in tensors between steps (``--log-tensor-memory``): parameters, kept
  gradients, optimizer state and the optimizers' flat buffers.  This is what ZeRO partitions,
  and it is set against its arithmetic: with P parameters, fp32, Adam and N ranks, megatron's
  distributed optimizer holds 4P (weights) + 4P (gradient buffer) + 8P/N (moments); DeepSpeed
  frees gradients after its step, so ZeRO-0 holds 4P + 8P, ZeRO-1 and 2 4P + 4P/N (its fp32
  partition) + 8P/N, ZeRO-3 (4P + 4P + 8P + 4P)/N (weights, fp32 partition, moments and its
  kept gradient partition).
- peak: the resident high-water mark minus the process before the model was built: adds the
  activations of one micro-batch, ZeRO-3's gathered layers, and the heap the allocator keeps.

The variants run one after another, round after round (interleaved).

    python bench/bench_deepspeed.py [--rounds 2] [--iters 4] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_megatron_lm import SHAPE, TOKENIZER, corpus  # noqa: E402
from recipes.train.deepspeed_engine import AUTO_ZERO  # noqa: E402

VARIANTS = {
    "built-in, distributed optimizer": ["--use-distributed-optimizer"],
    "DeepSpeed ZeRO-0": ["--deepspeed", "--zero-stage", "0"],
    "DeepSpeed ZeRO-1": ["--deepspeed", "--zero-stage", "1"],
    "DeepSpeed ZeRO-2": ["--deepspeed", "--zero-stage", "2"],
    "DeepSpeed ZeRO-3": ["--deepspeed", "--zero-stage", "3"],
}


def run(data: str, flags, iters: int, dtype: str, work: Path, tag: str, ds_config: Path):
    metrics = work / f"{tag}.jsonl"
    if "--deepspeed" in flags:
        flags = flags + ["--deepspeed_config", str(ds_config)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "recipes.pretrain", *SHAPE,
           "--data-path", data, "--tokenizer-name-or-path", str(TOKENIZER), "--micro-batch-size", "1",
           "--global-batch-size", "2", "--train-iters", str(iters), "--lr", "1e-4", "--split", "100,0,0",
           f"--{dtype}", "--metrics-file", str(metrics), "--log-tensor-memory", *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    recs = [json.loads(line) for line in open(metrics)]
    params = int(re.search(r"parameters: ([\d,]+) on rank 0", proc.stdout).group(1).replace(",", ""))
    return {"params": params, "step": statistics.median(r["step_time_s"] for r in recs[1:]),
            "held": statistics.median(r["tensor_memory_gib"] for r in recs),
            "peak": max(r["peak_rss_gib"] for r in recs) - recs[0]["rss_at_start_gib"]}


def held_arithmetic(p: int, n: int, dtype: str) -> dict:
    """Bytes each variant holds between steps, per rank (the module docstring's arithmetic)."""
    w = 4 if dtype == "fp32" else 2  # bytes per model weight (and per ZeRO-3 kept gradient)
    # fp32 main params: megatron's and ZeRO-0's only in bf16 (ZeRO 1-3 keep an fp32 partition in both)
    main = 0 if dtype == "fp32" else 4
    return {"built-in, distributed optimizer": w * p + 4 * p + (main + 8) * p / n,
            "DeepSpeed ZeRO-0": (w + main + 8) * p,
            "DeepSpeed ZeRO-1": w * p + 12 * p / n, "DeepSpeed ZeRO-2": w * p + 12 * p / n,
            "DeepSpeed ZeRO-3": (w + 4 + 8 + w) * p / n}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    from recipes.data import preprocess_data

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        preprocess_data.main(["--input", str(corpus(work, 2000)), "--tokenizer-name-or-path", str(TOKENIZER),
                              "--output-prefix", str(work / "c"), "--append-eod", "--log-interval", str(10 ** 9)])
        ds_config = work / "ds.json"
        ds_config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                                         "zero_optimization": {k: "auto" for k in AUTO_ZERO}}))
        runs = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name, flags in VARIANTS.items():
                runs[name].append(run(str(work / "c_text_document"), flags, args.iters, args.dtype, work,
                                      f"{r}_{len(runs[name])}_{name[-6:]}", ds_config))
        print(f"DP=2, CPU-sized LLaMA-2, {args.dtype}, micro-batch 1, global batch 2, median step of "
              f"{args.iters - 1} after the first, {args.rounds} interleaved rounds:")
        base = statistics.median(x["step"] for x in runs["built-in, distributed optimizer"])
        med = {name: {k: statistics.median(x[k] for x in xs) for k in ("step", "held", "peak")}
               for name, xs in runs.items()}
        for name, m in med.items():
            print(f"  {name}: {m['step']:.2f} s/step ({m['step'] / base:.2f}x the distributed optimizer's); held "
                  f"{m['held']:.2f} GiB per rank ({m['held'] / med['DeepSpeed ZeRO-1']['held']:.2f}x ZeRO-1's, "
                  f"{m['held'] / med['DeepSpeed ZeRO-0']['held']:.2f}x ZeRO-0's), peak {m['peak']:.2f} GiB; runs "
                  f"{[(round(x['step'], 2), round(x['held'], 2), round(x['peak'], 2)) for x in runs[name]]}",
                  flush=True)
        p, n = runs["DeepSpeed ZeRO-1"][0]["params"], 2
        theory = held_arithmetic(p, n, args.dtype)
        print(f"  held against the arithmetic (P = {p:,}, N = {n}, {args.dtype}):")
        for name, want in theory.items():
            print(f"    {name}: {med[name]['held']:.3f} GiB measured, {want / 2 ** 30:.3f} GiB computed")


if __name__ == "__main__":
    main()
