"""Evaluation throughput (questions/s) of recipes.evaluate vs lm-eval's HF backend on the same
model and questions, and LoRA step time vs full fine-tuning, each as a ratio in one run.

    OMP_NUM_THREADS=2 python bench/bench_finetune_eval.py [--eval] [--lora] [--rounds 3]

Model: the real stories260K (converted to Megatron; its HF export for lm-eval).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def bench_eval(tmp: Path, rounds: int):
    from converters import hf_to_megatron, megatron_to_hf
    from recipes import evaluate, inference
    from recipes.tokenizer import load_tokenizer
    from tests.helpers import lm_eval_reference as ref

    tmp.mkdir(parents=True)
    hf_to_megatron.main(["--input-model-dir", str(FIXTURES / "stories260K"), "--output-model-dir", str(tmp / "mg")])
    megatron_to_hf.main(["--input-model-dir", str(tmp / "mg"), "--output-model-dir", str(tmp / "hf")])
    tasks = ref.mmlu_tasks(FIXTURES / "mmlu" / "data", tmp, limit=None)
    questions = evaluate.mmlu_questions(FIXTURES / "mmlu" / "data" / "test", 0)
    lm = inference.load(tmp / "mg", 1, 1)
    tok = load_tokenizer(str(tmp / "hf"))
    t_ours, t_ref = [], []
    for _ in range(rounds):  # interleaved
        t = time.perf_counter()
        evaluate.evaluate(lm, tok, questions, lm.shape.seq_length, batch_size=16)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref.run(tmp / "hf", tmp, tasks, 0)
        t_ref.append(time.perf_counter() - t)
    n = len(questions)
    a, b = statistics.median(t_ours), statistics.median(t_ref)
    print(f"MMLU 0-shot, {n} questions (4 subjects), stories260K, batch 16: recipes.evaluate {n / a:.1f} questions/s, "
          f"lm-eval HF backend {n / b:.1f} questions/s (incl. its task setup); ours/lm-eval = {b / a:.2f}x")


def bench_lora(tmp: Path, rounds: int, iters: int):
    from converters import hf_to_megatron
    from recipes import preprocess_data

    tmp.mkdir(parents=True)
    hf = FIXTURES / "stories260K"
    hf_to_megatron.main(["--input-model-dir", str(hf), "--output-model-dir", str(tmp / "base")])
    preprocess_data.main(["--input", str(FIXTURES / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(hf), "--output-prefix", str(tmp / "sft"), "--handler-name", "GeneralInstructionHandler",
                          "--seq-length", "256", "--workers", "1", "--log-interval", "100000"])
    common = ["--load", str(tmp / "base"), "--data-path", str(tmp / "sft"), "--is-instruction-dataset",
              "--train-iters", str(iters), "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
              "--lr", "1e-3", "--log-interval", "1000"]
    lora = ["--lora-target-modules", "query_key_value", "dense", "gate_proj", "up_proj", "down_proj",
            "--lora-r", "8", "--lora-alpha", "16"]
    times = {"full": [], "lora": []}
    for r in range(rounds):
        for name, extra in (("full", []), ("lora", lora)):
            metrics = tmp / f"{name}{r}.jsonl"
            subprocess.run([sys.executable, "-m", "recipes.pretrain", *common, *extra, "--metrics-file", str(metrics)],
                           check=True, cwd=ROOT, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            recs = [json.loads(l) for l in open(metrics)][2:]  # skip warm-up steps
            times[name].append(statistics.median(8 * 256 / rec["tokens_per_s_per_device"] for rec in recs))
    a, b = statistics.median(times["lora"]), statistics.median(times["full"])
    print(f"stories260K, batch 8 x 256 tokens, fp32, 1 process: step time LoRA (r=8, all linears) {a * 1e3:.1f} ms, "
          f"full fine-tune {b * 1e3:.1f} ms; LoRA/full = {a / b:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp())
    if args.eval or not args.lora:
        bench_eval(tmp / "eval", args.rounds)
    if args.lora or not args.eval:
        bench_lora(tmp / "lora", args.rounds, args.iters)


if __name__ == "__main__":
    main()
