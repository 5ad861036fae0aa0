"""MMLU and BoolQ by answer likelihood, on a Megatron checkpoint at any TP/PP.

    torchrun --nproc-per-node 2 -m recipes.evaluate --task mmlu --task-data-path ./mmlu/data/test/ \\
        --load ./llama2-7b-tp8pp1 --tokenizer-name-or-path ./llama-2-7b-hf [--num-fewshot 5] [--output-json out.json]
    ... --task boolq --task-data-path ./boolq_dev(.jsonl or a folder of them)

Prompts (AscendSpeed's, and lm-evaluation-harness's, so scores can be checked against it):
- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
  then k examples from ``{subject}_dev.csv`` (the ``dev`` folder beside the test folder, or
  the same folder), each "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n",
  then the question and "\\nAnswer:".  Choices " A" .. " D"; the prediction is the most likely.
- BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:", choices " no" / " yes".  The original
  dev.jsonl's title is joined as "{title} -- {passage}", which is SuperGLUE's passage, so
  both schemas give the same prompt.
Tokens: BOS + context, continuation = tokens(context + choice) after the context's (lm-eval's
rule); sequences longer than the model keep their last ``seq_length`` tokens.

Scoring is batched and KV-free: one forward pass per batch of sequences; choices whose
scoring input is identical (single-token answers) share one pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from recipes import inference, parallel

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    qid: str
    group: str            # MMLU subject / "boolq"
    context: str
    choices: Tuple[str, ...]
    answer: int


# ---------------------------------------------------------------- task data
def _read_mmlu_csv(path: Path) -> List[List[str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{path} row {i}: expected question,A,B,C,D,answer(A-D), got {len(row)} fields")
            rows.append(row)
    return rows


def mmlu_example(row) -> str:
    q, *opts = row[:5]
    return q.strip() + "".join(f"\n{l}. {o}" for l, o in zip(LETTERS, opts)) + "\nAnswer:"


def mmlu_questions(data_path, num_fewshot: int = 0, limit: Optional[int] = None) -> List[Question]:
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise FileNotFoundError(f"--task-data-path {data_path}: not a folder of {{subject}}_test.csv files")
    tests = sorted(data_path.glob("*_test.csv"))
    if not tests:
        raise FileNotFoundError(f"{data_path}: no *_test.csv files")
    out = []
    for test in tests:
        subject = test.name[:-len("_test.csv")]
        shots = ""
        if num_fewshot:
            dev = next((p for p in (data_path.parent / "dev" / f"{subject}_dev.csv", data_path / f"{subject}_dev.csv")
                        if p.is_file()), None)
            if dev is None:
                raise FileNotFoundError(f"{subject}: --num-fewshot {num_fewshot} needs {subject}_dev.csv in "
                                        f"{data_path.parent / 'dev'} or {data_path}")
            dev_rows = _read_mmlu_csv(dev)
            if len(dev_rows) < num_fewshot:
                raise ValueError(f"{dev}: {len(dev_rows)} examples, fewer than --num-fewshot {num_fewshot}")
            shots = "".join(f"{mmlu_example(r)} {r[5].strip()}\n\n" for r in dev_rows[:num_fewshot])
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for i, row in enumerate(_read_mmlu_csv(test)[:limit]):
            out.append(Question(f"{subject}/{i}", subject, header + shots + mmlu_example(row), LETTERS,
                                LETTERS.index(row[5].strip())))
    return out


def _boolq_label(rec, where):
    if "answer" in rec:
        v = rec["answer"]
    elif "label" in rec:
        v = rec["label"]
    else:
        raise ValueError(f"{where}: no 'answer' or 'label' field")
    if isinstance(v, str):
        if v.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: label {v!r} is not true/false")
        return int(v.lower() in ("true", "1"))
    return int(bool(v))


def boolq_questions(data_path, limit: Optional[int] = None) -> List[Question]:
    data_path = Path(data_path)
    files = sorted(data_path.glob("*.jsonl")) if data_path.is_dir() else [data_path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"--task-data-path {data_path}: no BoolQ .jsonl file")
    out = []
    for f in files:
        for i, line in enumerate(open(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            where = f"{f} row {i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if "question" not in rec or "passage" not in rec:
                raise ValueError(f"{where}: needs 'question' and 'passage'")
            passage = f"{rec['title']} -- {rec['passage']}" if rec.get("title") else rec["passage"]
            out.append(Question(f"{f.name}/{i}", "boolq", f"{passage}\nQuestion: {rec['question']}?\nAnswer:",
                                ("no", "yes"), _boolq_label(rec, where)))
            if limit and len(out) >= limit:
                return out
    return out


# ---------------------------------------------------------------- scoring
def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """lm-eval's rule: trailing context spaces move to the continuation; the continuation's
    tokens are those of context+continuation after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = [tokenizer.bos_id] + tokenizer.encode(context)
    whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx):]


def score(lm, requests: Sequence[Tuple[List[int], List[int]]], max_len: int, batch_size: int,
          progress: bool = False) -> List[float]:
    """Sum of log-probs of each continuation given its context; one forward per distinct input."""
    plan = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("empty continuation")
        whole = (ctx + cont)[-(max_len + 1):]
        plan.append((tuple(whole[:-1]), cont))
    uniq = sorted({inp for inp, _ in plan}, key=lambda t: -len(t))  # similar lengths together: less padding
    logprobs: Dict[tuple, torch.Tensor] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(uniq), desc="scoring", unit="seq", disable=not progress or os.environ.get("TQDM_DISABLE") == "1")
    for start in range(0, len(uniq), batch_size):
        chunk = uniq[start:start + batch_size]
        width = max(len(t) for t in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, t in enumerate(chunk):
            tokens[i, :len(t)] = torch.tensor(t)  # right padding: causal attention never looks at it
        logp = torch.log_softmax(inference.full_logits(lm, tokens), dim=-1)
        for i, t in enumerate(chunk):
            logprobs[t] = logp[i, :len(t)]
        bar.update(len(chunk))
    bar.close()
    out = []
    for inp, cont in plan:
        tail = logprobs[inp][-len(cont):]
        out.append(float(tail.gather(1, torch.tensor(cont).unsqueeze(1)).sum()))
    return out


def evaluate(lm, tokenizer, questions: List[Question], max_len: int, batch_size: int, progress=False):
    requests, owners = [], []
    for qi, q in enumerate(questions):
        for c in q.choices:
            requests.append(encode_pair(tokenizer, q.context, " " + c))
            owners.append(qi)
    scores = score(lm, requests, max_len, batch_size, progress)
    per_q: List[List[float]] = [[] for _ in questions]
    for qi, s in zip(owners, scores):
        per_q[qi].append(s)
    results = []
    for q, s in zip(questions, per_q):
        pred = max(range(len(s)), key=lambda k: (s[k], -k))  # ties: the first choice, as argmax
        results.append({"id": q.qid, "group": q.group, "loglikelihoods": s, "prediction": pred, "answer": q.answer,
                        "correct": pred == q.answer})
    return results


def table(results) -> Tuple[str, dict]:
    groups: Dict[str, List[bool]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r["correct"])
    width = max([len(g) for g in groups] + [len("subject")])
    lines = [f"{'subject':<{width}}  questions  accuracy", "-" * (width + 21)]
    for g, c in sorted(groups.items()):
        lines.append(f"{g:<{width}}  {len(c):9d}  {sum(c) / len(c):8.4f}")
    total = [c for cs in groups.values() for c in cs]
    micro = sum(total) / len(total)
    lines += ["-" * (width + 21), f"{'micro average':<{width}}  {len(total):9d}  {micro:8.4f}"]
    summary = {"accuracy": micro, "questions": len(total),
               "per_group": {g: {"questions": len(c), "accuracy": sum(c) / len(c)} for g, c in groups.items()}}
    return "\n".join(lines), summary


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("mmlu", "boolq"), required=True, help="the benchmark")
    p.add_argument("--task-data-path", required=True,
                   help="MMLU: the folder of {subject}_test.csv; BoolQ: a .jsonl file or a folder of them")
    inference.add_checkpoint_flags(p)
    p.add_argument("--num-fewshot", type=int, default=0, help="MMLU examples from {subject}_dev.csv (default 0)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions per subject / file (default: all)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the model's positions")
    p.add_argument("--output-json", default=None, help="accuracies and per-question predictions")
    return p


def read_questions(args) -> List[Question]:
    if args.task == "mmlu":
        return mmlu_questions(args.task_data_path, args.num_fewshot, args.limit)
    if args.num_fewshot:
        raise ValueError("--num-fewshot is for MMLU; BoolQ is scored zero-shot")
    return boolq_questions(args.task_data_path, args.limit)


def main(argv=None):
    args = build_parser().parse_args(argv)
    questions = read_questions(args)  # bad task data is refused before any model loads
    lm, tokenizer = inference.open_checkpoint(args)
    rank = dist.get_rank()
    max_len = min(args.seq_length or lm.shape.seq_length, lm.shape.seq_length)
    t0 = time.time()
    results = evaluate(lm, tokenizer, questions, max_len, args.micro_batch_size, progress=rank == 0)
    elapsed = time.time() - t0
    text, summary = table(results)
    summary.update(task=args.task, num_fewshot=args.num_fewshot, load=str(args.load), seconds=elapsed,
                   questions_per_s=len(results) / max(elapsed, 1e-9))
    if rank == 0:
        lora_txt = f" + LoRA {args.lora_load}" if args.lora_load else ""
        print(f"\n{args.task} ({args.num_fewshot}-shot), {args.load}{lora_txt}\n{text}\n"
              f"{len(results)} questions in {elapsed:.1f} s ({summary['questions_per_s']:.1f} questions/s)", flush=True)
        if args.output_json:
            Path(args.output_json).write_text(json.dumps({**summary, "predictions": results}, indent=1))
    parallel.destroy()
    return summary, results


if __name__ == "__main__":
    main()
