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

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def bench_eval(tmp: Path, rounds: int):
    from converters import hf_to_megatron, megatron_to_hf
    from recipes.infer import evaluate, inference
    from recipes.data.tokenizer import load_tokenizer
    from tests.helpers import lm_eval_reference as ref

    tmp.mkdir(parents=True)
    hf_to_megatron.main(["--input-model-dir", str(FIXTURES / "stories260K"), "--output-model-dir", str(tmp / "mg")])
    megatron_to_hf.main(["--input-model-dir", str(tmp / "mg"), "--output-model-dir", str(tmp / "hf")])
    tasks = ref.mmlu_tasks(FIXTURES / "mmlu" / "data", tmp, limit=None)
    questions = evaluate.mmlu_questions(FIXTURES / "mmlu" / "data" / "test", 0)
    lm = inference.load(tmp / "mg", 1, 1)
    tok = load_tokenizer(str(tmp / "hf"))
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=16, device="cpu")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(q.context, " " + c), idx=k)
                for q in questions for k, c in enumerate(q.choices)]
    t_ours, t_ref, t_ref_full = [], [], []
    for _ in range(rounds):  # interleaved
        t = time.perf_counter()
        evaluate.evaluate(lm, tok, questions, lm.shape.seq_length, batch_size=16)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        hflm.loglikelihood(requests, disable_tqdm=True)  # lm-eval's scoring core, model already loaded
        t_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref.run(tmp / "hf", tmp, tasks, 0)  # the whole harness run: model load, task setup, scoring
        t_ref_full.append(time.perf_counter() - t)
    n = len(questions)
    a, b, c = statistics.median(t_ours), statistics.median(t_ref), statistics.median(t_ref_full)
    print(f"MMLU 0-shot, {n} questions (4 subjects, {len(requests)} answer log-likelihoods), stories260K, batch 16: "
          f"recipes.evaluate {n / a:.1f} questions/s; lm-eval HF backend scoring {n / b:.1f} questions/s "
          f"(whole harness run {n / c:.1f}); ours/lm-eval = {b / a:.2f}x (scoring), {c / a:.2f}x (whole run)")


def bench_lora(tmp: Path, rounds: int, iters: int, wide: bool):
    from converters import hf_to_megatron
    from recipes.data import preprocess_data

    tmp.mkdir(parents=True)
    hf = FIXTURES / "stories260K"
    model = hf
    if wide:  # stories260K's tokenizer and vocabulary, a CPU-sized body (GEMM-bound)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                     num_attention_heads=16, num_key_value_heads=16, vocab_size=512,
                                     max_position_embeddings=512, tie_word_embeddings=False)).save_pretrained(tmp / "hf")
        model = tmp / "hf"
    hf_to_megatron.main(["--input-model-dir", str(model), "--output-model-dir", str(tmp / "base")])
    preprocess_data.main(["--input", str(FIXTURES / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(hf), "--output-prefix", str(tmp / "sft"), "--handler-name", "GeneralInstructionHandler",
                          "--seq-length", "256", "--workers", "1", "--log-interval", "100000"])
    common = ["--load", str(tmp / "base"), "--data-path", str(tmp / "sft"), "--is-instruction-dataset",
              "--train-iters", str(iters), "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
              "--lr", "1e-3", "--log-interval", "1000", "--tokenizer-name-or-path", str(hf)]
    lora = ["--lora-target-modules", "query_key_value", "dense", "gate_proj", "up_proj", "down_proj",
            "--lora-r", "8", "--lora-alpha", "16"]
    times = {"full": [], "lora": []}
    for r in range(rounds):
        for name, extra in (("full", []), ("lora", lora)):
            metrics = tmp / f"{name}{r}.jsonl"
            from tests.conftest import free_port

            env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()))
            proc = subprocess.run([sys.executable, "-m", "recipes.pretrain", *common, *extra, "--metrics-file",
                                   str(metrics)], cwd=ROOT, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            recs = [json.loads(l) for l in open(metrics)][2:]  # skip warm-up steps
            times[name].append(statistics.median(8 * 256 / rec["tokens_per_s_per_device"] for rec in recs))
    a, b = statistics.median(times["lora"]), statistics.median(times["full"])
    shape = "4 layers x 1024 hidden (random)" if wide else "stories260K"
    print(f"{shape}, batch 8 x 256 tokens, fp32, 1 process: step time LoRA (r=8, all linears) {a * 1e3:.1f} ms, "
          f"full fine-tune {b * 1e3:.1f} ms; LoRA/full = {a / b:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--wide", action="store_true", help="LoRA vs full on a 4-layer, 1024-wide model")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp())
    if args.eval or not args.lora:
        bench_eval(tmp / "eval", args.rounds)
    if args.lora or not args.eval:
        bench_lora(tmp / "lora", args.rounds, args.iters, args.wide)


if __name__ == "__main__":
    main()
