"""ZeRO-1/2/3 under the recipe's DeepSpeed engine against the built-in loop with megatron's
distributed optimizer, DP=2 on the CPU, CPU-sized LLaMA-2 (8 x 1024, ffn 2816, 16 heads,
vocab 32000, seq 512): step time, and per rank the resident memory the model state adds (the
high-water mark after the first steps minus the process's memory before the model was built:
parameters, gradients, optimizer state, and the activations of one micro-batch).  The
variants run one after another, round after round (interleaved).

    python bench/bench_deepspeed.py [--rounds 2] [--iters 4] [--dtype fp32|bf16]
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_megatron_lm import SHAPE, TOKENIZER, corpus  # noqa: E402

VARIANTS = {
    "built-in, distributed optimizer": ["--use-distributed-optimizer"],
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
           f"--{dtype}", "--metrics-file", str(metrics), *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    recs = [json.loads(line) for line in open(metrics)]
    return {"step": statistics.median(r["step_time_s"] for r in recs[1:]),
            "state": max(r["peak_rss_gib"] for r in recs) - recs[0]["rss_at_start_gib"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    from recipes import preprocess_data

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        preprocess_data.main(["--input", str(corpus(work, 2000)), "--tokenizer-name-or-path", str(TOKENIZER),
                              "--output-prefix", str(work / "c"), "--append-eod", "--log-interval", str(10 ** 9)])
        ds_config = work / "ds.json"
        ds_config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
        runs = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name, flags in VARIANTS.items():
                runs[name].append(run(str(work / "c_text_document"), flags, args.iters, args.dtype, work,
                                      f"{r}_{len(runs[name])}_{name[-6:]}", ds_config))
        print(f"DP=2, CPU-sized LLaMA-2, {args.dtype}, micro-batch 1, global batch 2, median step of "
              f"{args.iters - 1} after the first, {args.rounds} interleaved rounds:")
        base = statistics.median(x["step"] for x in runs["built-in, distributed optimizer"])
        zero1_state = statistics.median(x["state"] for x in runs["DeepSpeed ZeRO-1"])
        for name, xs in runs.items():
            step, state = statistics.median(x["step"] for x in xs), statistics.median(x["state"] for x in xs)
            print(f"  {name}: {step:.2f} s/step ({step / base:.2f}x the distributed optimizer's), model state "
                  f"{state:.2f} GiB per rank ({state / zero1_state:.2f}x ZeRO-1's); runs "
                  f"{[(round(x['step'], 2), round(x['state'], 2)) for x in xs]}", flush=True)


if __name__ == "__main__":
    main()
