"""Evaluation throughput (questions/s) of recipes.evaluate vs lm-eval's HF backend on the same
model and questions, and LoRA step time vs full fine-tuning, each as a ratio in one run.

    OMP_NUM_THREADS=2 python bench/bench_finetune_eval.py [--eval [--batches 1 8] [--tasks mmlu boolq] [--profile]]
        [--lora] [--rounds 3]

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


def _task_questions(evaluate, task):
    if task == "mmlu":
        return evaluate.mmlu_questions(FIXTURES / "mmlu" / "data" / "test", 0)
    return evaluate.boolq_questions(FIXTURES / "boolq" / "superglue_BoolQ_val_first200.jsonl")


def bench_eval(tmp: Path, rounds: int, batches, tasks, profile: bool):
    """Per task and batch size: ours and lm-eval's scoring core (HFLM.loglikelihood, the model
    already loaded, tokenization included as in ours), alternated round by round; the
    predictions must be identical."""
    from converters import hf_to_megatron, megatron_to_hf
    from recipes.infer import evaluate, inference
    from recipes.data.tokenizer import load_tokenizer
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tmp.mkdir(parents=True)
    hf_to_megatron.main(["--input-model-dir", str(FIXTURES / "stories260K"), "--output-model-dir", str(tmp / "mg")])
    megatron_to_hf.main(["--input-model-dir", str(tmp / "mg"), "--output-model-dir", str(tmp / "hf")])
    lm = inference.load(tmp / "mg", 1, 1)
    tok = load_tokenizer(str(tmp / "hf"))
    print(f"stories260K (fp32, {torch.get_num_threads()} threads); ours = recipes.evaluate's scoring, lm-eval = "
          f"HFLM.loglikelihood on the HF export; median of {rounds} alternated rounds after a warm-up "
          "round; predictions asserted identical in every round")
    print(f"  {'task':<6} {'batch':>5} {'questions':>9} {'ours q/s':>9} {'lm-eval q/s':>11} {'ours/lm-eval':>12}  "
          "predictions")
    for task in tasks:
        questions = _task_questions(evaluate, task)
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=(q.context, " " + c), idx=k)
                    for q in questions for k, c in enumerate(q.choices)]
        for bs in batches:
            hflm = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=bs, device="cpu")
            t_ours, t_ref = [], []
            for r in range(rounds + 1):  # round 0 warms up (first-call allocation, lazy imports): not timed
                t = time.perf_counter()
                ours = evaluate.evaluate(lm, tok, questions, lm.shape.seq_length, batch_size=bs)
                t_ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                theirs = hflm.loglikelihood(requests, disable_tqdm=True)
                t_ref.append(time.perf_counter() - t)
                preds, k = [], 0
                for q in questions:
                    preds.append(evaluate.predict([ll for ll, _ in theirs[k:k + len(q.choices)]]))
                    k += len(q.choices)
                differ = [i for i, (p, o) in enumerate(zip(preds, ours)) if p != o["prediction"]]
                if differ:  # two scorers that disagree are not timing the same work
                    raise SystemExit(f"{task}, batch {bs}, round {r}: {len(differ)} of {len(questions)} predictions "
                                     f"differ from lm-eval's, the first at question {differ[0]}")
            same = len(questions)
            a, b = statistics.median(t_ours[1:]), statistics.median(t_ref[1:])
            n = len(questions)
            print(f"  {task:<6} {bs:>5} {n:>9} {n / a:>9.1f} {n / b:>11.1f} {b / a:>11.2f}x  "
                  f"{same}/{n} identical", flush=True)
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(evaluate.evaluate, lm, tok, questions, lm.shape.seq_length, bs)
                print(f"  profile of ours, {task} batch {bs} (own time, top 8):")
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(8)


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
            times[name].append(statistics.median(rec["step_time_s"] for rec in recs))
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
    p.add_argument("--tasks", nargs="+", default=["mmlu", "boolq"], choices=["mmlu", "boolq"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8],
                   help="batch sizes (default: 1 and recipes.evaluate's default --micro-batch-size, 8)")
    p.add_argument("--profile", action="store_true", help="and a cProfile of ours per task and batch")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp())
    if args.eval or not args.lora:
        bench_eval(tmp / "eval", args.rounds, args.batches, args.tasks, args.profile)
    if args.lora or not args.eval:
        bench_lora(tmp / "lora", args.rounds, args.iters, args.wide)


if __name__ == "__main__":
    main()
