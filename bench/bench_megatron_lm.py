"""This project's tools against stock Megatron-LM's, side by side, interleaved run by run:

- step: the pretrain recipe's built-in loop vs stock ``pretrain_gpt.py`` (the recipe's
  ``--megatron-lm`` engine: the same settings written as Megatron-LM flags), CPU-sized
  LLaMA-2 (8 x 1024, ffn 2816, 16 heads, vocab 32000, seq 512), step times and CPU-MFU;
- preprocess: ``recipes.preprocess_data`` vs Megatron-LM's ``tools/preprocess_data.py`` on
  the same jsonl corpus and LLaMA-2 tokenizer, 1 and 2 workers, documents/s of the whole
  command (start-up included, for both);
- convert: ``converters.hf_to_megatron`` vs ``tools/checkpoint/convert.py`` (loader
  llama_mistral, saver core, local implementation) on the shipped stories260K: time and the
  peak RSS of each command's process tree.

    python bench/bench_megatron_lm.py --megatron-lm ../shared/third_party/Megatron-LM [--parts step,preprocess,convert]
        [--rounds 2] [--iters 5] [--dtype fp32|bf16] [--docs 40000]

The checkout is copied to a temp folder (``import ascend_patches`` added to its scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = ["--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816", "--num-attention-heads", "16",
         "--seq-length", "512", "--max-position-embeddings", "512"]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizer" / "tokenizer.model"


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                TQDM_DISABLE="1")


def corpus(work: Path, docs: int) -> Path:
    rows = json.loads((ROOT / "recipes" / "demo_data" / "alpaca_data_sample.json").read_text())
    path = work / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(docs):
            r = rows[i % len(rows)]
            f.write(json.dumps({"text": f"{r['instruction']}\n{r['input']}\n{r['output']}"}) + "\n")
    return path


def _timed(cmd, cwd=ROOT) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env())
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def bench_preprocess(checkout: Path, work: Path, docs: int, rounds: int):
    data = corpus(work, docs)
    cmds = {
        "ours": lambda w: [sys.executable, "-m", "recipes.preprocess_data", "--input", data, "--tokenizer-name-or-path",
                           TOKENIZER, "--output-prefix", work / f"ours{w}", "--workers", w, "--append-eod",
                           "--log-interval", 10 ** 9],
        "megatron-lm": lambda w: [sys.executable, checkout / "tools" / "preprocess_data.py", "--input", data,
                                  "--output-prefix", work / f"theirs{w}", "--tokenizer-type", "Llama2Tokenizer",
                                  "--tokenizer-model", TOKENIZER, "--workers", w, "--append-eod",
                                  "--log-interval", 10 ** 9],
    }
    print(f"preprocessing {docs:,} documents (Alpaca rows, LLaMA-2 tokenizer), whole command wall time:")
    for workers in (1, 2):
        times = {k: [] for k in cmds}
        for _ in range(rounds):
            for name, cmd in cmds.items():  # interleaved
                times[name].append(_timed([str(c) for c in cmd(workers)], cwd=checkout if name != "ours" else ROOT))
        med = {k: statistics.median(v) for k, v in times.items()}
        rates = {k: docs / v for k, v in med.items()}
        print(f"  workers={workers}: ours {rates['ours']:,.0f} docs/s ({med['ours']:.1f} s), Megatron-LM "
              f"{rates['megatron-lm']:,.0f} docs/s ({med['megatron-lm']:.1f} s): ratio "
              f"{rates['ours'] / rates['megatron-lm']:.2f}x (runs: ours {times['ours']}, Megatron-LM "
              f"{times['megatron-lm']})", flush=True)
    return work / "ours1_text_document"


def _step_run(data, engine_flags, iters, dtype, work, tag):
    metrics = work / f"{tag}.jsonl"
    cmd = [sys.executable, "-m", "recipes.pretrain", *SHAPE, "--data-path", str(data), "--tokenizer-name-or-path",
           str(TOKENIZER), "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", str(iters),
           "--lr", "1e-4", "--log-interval", "1", "--split", "100,0,0", f"--{dtype}", *engine_flags]
    if not engine_flags:
        cmd += ["--metrics-file", str(metrics)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    if engine_flags:
        ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", proc.stdout)]
        return [m / 1e3 for m in ms[1:]]  # the first step warms up
    return [json.loads(line)["step_time_s"] for line in open(metrics)][1:]


def bench_step(checkout: Path, data: Path, work: Path, iters: int, dtype: str, rounds: int):
    import torch

    from recipes.model import llama2
    from recipes.train import throughput

    shape = llama2.LlamaShape(8, 1024, 2816, 16, 16, 32000, 512)
    flops = throughput.train_flops_per_token(shape, 512, 32000) * 2 * 512  # one global batch of 2 x 512
    gemm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    runs = {"built-in": [], "stock Megatron-LM": [], "gemm": []}
    for _ in range(rounds):
        for name, flags in (("built-in", []), ("stock Megatron-LM", ["--megatron-lm", str(checkout)])):
            runs["gemm"].append(throughput.measured_gemm_tflops(gemm_dtype))
            runs[name].append(statistics.median(_step_run(data, flags, iters, dtype, work, f"{name}_{len(runs[name])}")))
    peak = statistics.median(runs["gemm"])
    print(f"pretrain step, CPU-sized LLaMA-2, {dtype}, micro/global batch 2, median step of {iters - 1} after the "
          f"first, {rounds} interleaved rounds; CPU-MFU against the median measured {dtype} GEMM rate "
          f"{peak * 1e3:.0f} GFLOP/s (range {min(runs['gemm']) * 1e3:.0f}-{max(runs['gemm']) * 1e3:.0f}):")
    for name in ("built-in", "stock Megatron-LM"):
        t = statistics.median(runs[name])
        print(f"  {name}: {t:.2f} s/step (runs {[round(x, 2) for x in runs[name]]}), CPU-MFU "
              f"{100 * flops / t / 1e12 / peak:.1f}%")
    pairs = [a / b for a, b in zip(runs["built-in"], runs["stock Megatron-LM"])]
    print(f"  built-in / stock step time: {statistics.median(pairs):.2f} (per round {[round(p, 2) for p in pairs]})")


def _run_measured(cmd, cwd) -> tuple:
    """(seconds, peak RSS in bytes of the command's whole process tree: stock convert.py runs its
    saver in a second process, so the tree's sum, polled every 20 ms)."""
    import psutil

    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: convert.py prints more than a pipe holds
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    log.seek(0)
    out = log.read()
    log.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed (rc {proc.returncode}):\n{out[-3000:]}")
    return seconds, peak


def bench_convert(checkout: Path, work: Path, rounds: int):
    """converters.hf_to_megatron vs stock tools/checkpoint/convert.py on the same HF model
    (stories260K), alternated run by run, whole commands (start-up included, for both)."""
    from tests.helpers.megatron_lm import convert_command

    hf = ROOT.parent / "shared" / "fixtures" / "stories260K"
    commands = {
        "ours": lambda out: ([sys.executable, "-m", "converters.hf_to_megatron", "--input-model-dir", str(hf),
                              "--output-model-dir", str(out)], ROOT),
        "stock": lambda out: (convert_command(checkout, hf, out), checkout),
    }
    runs = {name: [] for name in commands}
    for r in range(rounds):
        for name, make in commands.items():
            out = work / f"convert_{name}_{r}"
            cmd, cwd = make(out)
            runs[name].append(_run_measured(cmd, cwd))
            shutil.rmtree(out, ignore_errors=True)
    t = {n: statistics.median(s for s, _ in v) for n, v in runs.items()}
    m = {n: statistics.median(b for _, b in v) for n, v in runs.items()}
    print(f"HF -> Megatron on stories260K, {rounds} interleaved rounds (median):")
    for n in commands:
        print(f"  {n}: {t[n]:.2f} s, peak RSS {m[n] / 2**20:.0f} MiB "
              f"(runs {[(round(s, 2), round(b / 2**20)) for s, b in runs[n]]})")
    pairs = [a[0] / b[0] for a, b in zip(runs["ours"], runs["stock"])]  # round by round: the machine's noise cancels
    print(f"  ours / stock: time {statistics.median(pairs):.2f} (median of the rounds' ratios "
          f"{[round(x, 2) for x in pairs]}; goal <= 0.5), peak RSS {m['ours'] / m['stock']:.2f} (goal <= 1.0)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megatron-lm", default=str(ROOT.parent / "shared" / "third_party" / "Megatron-LM"))
    p.add_argument("--parts", default="step,preprocess,convert")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--docs", type=int, default=40000)
    args = p.parse_args()
    from tests.helpers.megatron_lm import copy_checkout

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        checkout = copy_checkout(work / "Megatron-LM")  # import ascend_patches added to its scripts
        parts = args.parts.split(",")
        data = None
        if "preprocess" in parts or "step" in parts:
            data = bench_preprocess(checkout, work, args.docs if "preprocess" in parts else 2000,
                                    args.rounds if "preprocess" in parts else 1)
        if "step" in parts:
            bench_step(checkout, data, work, args.iters, args.dtype, args.rounds)
        if "convert" in parts:
            bench_convert(checkout, work, max(args.rounds, 3))


if __name__ == "__main__":
    main()
