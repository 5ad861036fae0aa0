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

Scoring does each context's work once (see ``score``), in batches of similar lengths.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import ascend_patches

from recipes.errors import ArgumentParser, BadInput, MissingInput
from recipes.progress import bar as progress_bar
from recipes.model import parallel
from recipes.infer import inference, settings

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    qid: str
    group: str            # MMLU subject / "boolq"
    context: str
    choices: Tuple[str, ...]
    answer: int


# ---------------------------------------------------------------- task data
def _read_mmlu_csv(path: Path, skipped: List[str]) -> List[List[str]]:
    """The well-formed rows; each bad one goes to ``skipped`` as 'file row N: why'."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    skipped.append(f"{path} row {i}: expected question,A,B,C,D,answer(A-D), got {len(row)} fields"
                                   + (f" ending {row[-1][:10]!r}" if len(row) == 6 else ""))
                    continue
                rows.append(row)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start}); re-export it as UTF-8 CSV") from None
    return rows


def _usable(questions: list, skipped: List[str], where) -> list:
    if not questions:
        first = f", the first: {skipped[0]}" if skipped else ""
        raise BadInput(f"{where}: no usable question ({len(skipped)} rows skipped{first})")
    return questions


def mmlu_example(row) -> str:
    q, *opts = row[:5]
    return q.strip() + "".join(f"\n{l}. {o}" for l, o in zip(LETTERS, opts)) + "\nAnswer:"


def mmlu_questions(data_path, num_fewshot: int = 0, limit: Optional[int] = None,
                   skipped: Optional[List[str]] = None) -> List[Question]:
    """Bad rows are skipped and listed in ``skipped``; refused only when nothing is left."""
    skipped = [] if skipped is None else skipped
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise MissingInput(f"--task-data-path {data_path}: not a folder of {{subject}}_test.csv files")
    tests = sorted(data_path.glob("*_test.csv"))
    if not tests:
        raise MissingInput(f"{data_path}: no *_test.csv files")
    out = []
    for test in tests:
        subject = test.name[:-len("_test.csv")]
        shots = ""
        if num_fewshot:
            dev = next((p for p in (data_path.parent / "dev" / f"{subject}_dev.csv", data_path / f"{subject}_dev.csv")
                        if p.is_file()), None)
            if dev is None:
                raise MissingInput(f"{subject}: --num-fewshot {num_fewshot} needs {subject}_dev.csv in "
                                        f"{data_path.parent / 'dev'} or {data_path}")
            dev_rows = _read_mmlu_csv(dev, skipped)
            if len(dev_rows) < num_fewshot:
                raise BadInput(f"{dev}: {len(dev_rows)} examples, fewer than --num-fewshot {num_fewshot}")
            shots = "".join(f"{mmlu_example(r)} {r[5].strip()}\n\n" for r in dev_rows[:num_fewshot])
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for i, row in enumerate(_read_mmlu_csv(test, skipped)[:limit]):
            out.append(Question(f"{subject}/{i}", subject, header + shots + mmlu_example(row), LETTERS,
                                LETTERS.index(row[5].strip())))
    return _usable(out, skipped, data_path)


def _boolq_label(rec, where):
    if "answer" in rec:
        v = rec["answer"]
    elif "label" in rec:
        v = rec["label"]
    else:
        raise BadInput(f"{where}: no 'answer' or 'label' field")
    if isinstance(v, str):
        if v.lower() not in ("true", "false", "1", "0"):
            raise BadInput(f"{where}: label {v!r} is not true/false")
        return int(v.lower() in ("true", "1"))
    return int(bool(v))


def boolq_questions(data_path, limit: Optional[int] = None, skipped: Optional[List[str]] = None) -> List[Question]:
    """Bad rows are skipped and listed in ``skipped``; refused only when nothing is left."""
    skipped = [] if skipped is None else skipped
    data_path = Path(data_path)
    files = sorted(data_path.glob("*.jsonl")) if data_path.is_dir() else [data_path]
    if not files or not files[0].is_file():
        raise MissingInput(f"--task-data-path {data_path}: no BoolQ .jsonl file")
    out = []
    for f in files:
        try:
            lines = f.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise BadInput(f"{f}: not UTF-8 text (byte {e.start}); BoolQ files are JSON lines") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{f} row {i}"
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "question" not in rec or "passage" not in rec:
                    raise BadInput(f"{where}: needs 'question' and 'passage'")
                label = _boolq_label(rec, where)
            except json.JSONDecodeError as e:
                skipped.append(f"{where}: not JSON ({e})")
                continue
            except BadInput as e:
                skipped.append(str(e))
                continue
            passage = f"{rec['title']} -- {rec['passage']}" if rec.get("title") else rec["passage"]
            out.append(Question(f"{f.name}/{i}", "boolq", f"{passage}\nQuestion: {rec['question']}?\nAnswer:",
                                ("no", "yes"), label))
            if limit and len(out) >= limit:
                return out
    return _usable(out, skipped, data_path)


# ---------------------------------------------------------------- scoring
def encode_pair(tokenizer, context: str, continuation: str, encode=None) -> Tuple[List[int], List[int]]:
    """lm-eval's rule: trailing context spaces move to the continuation; the continuation's
    tokens are those of context+continuation after the context's.  ``encode``: a caching
    encoder a caller shares across a question's choices."""
    encode = encode or tokenizer.encode
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = [tokenizer.bos_id] + list(encode(context))
    whole = [tokenizer.bos_id] + list(encode(context + continuation))
    return ctx, whole[len(ctx):]


@dataclass
class _Group:
    """The requests that share one (window-truncated) context."""
    context: Tuple[int, ...]
    members: List[int]           # request indices
    inputs: List[Tuple[int, ...]]  # per member: the context + its continuation but the last token


def _plan(requests, max_len: int) -> List[_Group]:
    groups: Dict[Tuple[int, ...], _Group] = {}
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise BadInput("empty continuation")
        whole = (ctx + cont)[-(max_len + 1):]  # lm-eval's window: the last max_len + 1 tokens
        context = tuple(whole[:len(whole) - len(cont)])
        g = groups.setdefault(context, _Group(context, [], []))
        g.members.append(k)
        g.inputs.append(tuple(whole[:-1]))
    return list(groups.values())


def _chain(inputs) -> Optional[Tuple[int, ...]]:
    """The longest input when every other is a prefix of it (then one forward scores them
    all: causal attention makes a position's logits depend on the tokens before it only)."""
    longest = max(inputs, key=len)
    return longest if all(longest[:len(t)] == t for t in inputs) else None


def _gather_scores(logits: torch.Tensor, rows, starts, conts) -> torch.Tensor:
    """Sum over each continuation of log p(token): row ``rows[i]``, positions from
    ``starts[i]``, tokens ``conts[i]``; every position in one gather (no loop over tokens)."""
    lens = torch.tensor([len(c) for c in conts])
    seg = torch.repeat_interleave(torch.arange(len(conts)), lens)
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    pos = torch.repeat_interleave(torch.tensor(starts), lens) + torch.arange(int(lens.sum())) - first
    row = torch.repeat_interleave(torch.tensor(rows), lens)
    tok = torch.tensor([t for c in conts for t in c])
    sel = logits[row, pos]
    lp = sel.gather(1, tok.unsqueeze(1)).squeeze(1) - torch.logsumexp(sel, dim=-1)
    return torch.zeros(len(conts), dtype=lp.dtype).index_add_(0, seg, lp)


def _score_chains(lm, requests, jobs, batch_size: int, out: List[float], bar) -> None:
    """``jobs``: (longest input, members); right-padded batches of similar lengths."""
    jobs = sorted(jobs, key=lambda j: -len(j[0]))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        width = max(len(t) for t, _ in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (t, _) in enumerate(chunk):
            tokens[i, :len(t)] = torch.tensor(t)  # right padding: causal attention never looks at it
        logits = inference.full_logits(lm, tokens)
        rows, starts, conts, ks = [], [], [], []
        for i, (_, members) in enumerate(chunk):
            for k, inp in members:
                cont = requests[k][1]
                # the logits at position p predict token p + 1
                rows.append(i), starts.append(len(inp) - len(cont)), conts.append(cont), ks.append(k)
        for k, v in zip(ks, _gather_scores(logits, rows, starts, conts).tolist()):
            out[k] = v
        bar.update(len(chunk))


def _score_branches(lm, requests, groups: List[_Group], batch_size: int, max_positions: int, out: List[float],
                    bar) -> None:
    """Contexts whose continuations diverge after their first token: each context runs once,
    left-padded so every row ends at the same position, into megatron's KV cache; then each
    continuation runs on its own copy of its context's cache.  Left padding keeps every
    distance between real tokens, which is all RoPE sees; the mask hides the padding."""
    from megatron.core.inference.contexts import StaticInferenceContext

    groups = sorted(groups, key=lambda g: -len(g.context))
    start = 0
    while start < len(groups):
        chunk = [groups[start]]
        width = len(chunk[0].context)
        # a batch's contexts and branches must fit the model's positions together
        while (start + len(chunk) < len(groups) and len(chunk) < batch_size
               and width + max(len(requests[k][1]) - 1 for g in chunk + [groups[start + len(chunk)]]
                               for k in g.members) <= max_positions):
            chunk.append(groups[start + len(chunk)])
        start += len(chunk)
        branches = [(gi, k) for gi, g in enumerate(chunk) for k in g.members]
        blen = max(len(requests[k][1]) - 1 for _, k in branches)
        b, nb = len(chunk), len(branches)
        tokens = torch.zeros(b, width, dtype=torch.long)
        pad = torch.zeros(b, width, dtype=torch.bool)
        for i, g in enumerate(chunk):
            tokens[i, width - len(g.context):] = torch.tensor(g.context)
            pad[i, :width - len(g.context)] = True
        mask = None  # no padding: the causal kernel, which is faster than any mask
        if pad.any():  # padding rows see themselves only, so they stay finite in the cache
            causal = torch.ones(width, width, dtype=torch.bool).triu_(1)
            mask = ((causal | pad[:, None, :]) & ~torch.eye(width, dtype=torch.bool))[:, None]
        ctx = StaticInferenceContext(nb, width + blen)
        stage = inference.stage_info()
        pos = torch.arange(width).unsqueeze(0).expand(b, width)
        last = inference.forward(lm, tokens, pos, ctx, stage, attention_mask=mask)
        if last is not None:  # megatron-core 0.19+ outside its inference mode returns every position's logits
            last = last[:, -1:]
        last = inference.broadcast_from_last_stage(last, (b, 1, lm.vocab_size), torch.float32, stage).cpu()
        ctx.sequence_len_offset += width
        owner = torch.tensor([gi for gi, _ in branches])
        ctx.swap_key_value_dict(owner.to(ascend_patches.device()))  # each branch its context's cache
        btok = torch.zeros(nb, blen, dtype=torch.long)
        for j, (_, k) in enumerate(branches):
            cont = requests[k][1][:-1]
            btok[j, :len(cont)] = torch.tensor(cont)
        if blen == 1 and mask is None:
            bmask = None  # one token per branch and nothing padded: every cached key is visible
        else:
            bmask = torch.cat([pad[owner][:, None, :].expand(nb, blen, width),
                               torch.ones(blen, blen, dtype=torch.bool).triu_(1).expand(nb, blen, blen)], dim=2)
            bmask = bmask[:, None]
        _all_logits(ctx)
        bpos = torch.arange(width, width + blen).unsqueeze(0).expand(nb, blen)
        blog = inference.forward(lm, btok, bpos, ctx, stage, attention_mask=bmask)
        blog = inference.broadcast_from_last_stage(blog, (nb, blen, lm.vocab_size), torch.float32, stage).cpu()
        # per branch (scored on the host: one copy of the logits per batch): the context's last logits, then the branch's own
        logits = torch.cat([last[owner], blog], dim=1)
        conts = [requests[k][1] for _, k in branches]
        for (_, k), v in zip(branches, _gather_scores(logits, list(range(nb)), [0] * nb, conts).tolist()):
            out[k] = v
        bar.update(len(chunk))


def _all_logits(ctx) -> None:
    """Logits for every position of the next forward: megatron-core 0.19+ reads the switch from
    the context's ``InferenceConfig`` (setting the old attribute there changes nothing, and only
    the last position's logits came back), older releases from the context itself."""
    config = getattr(ctx, "config", None)
    if config is not None and hasattr(config, "materialize_only_last_token_logits"):
        config.materialize_only_last_token_logits = False
    else:
        ctx.materialize_only_last_token_logits = False


def score(lm, requests: Sequence[Tuple[List[int], List[int]]], max_len: int, batch_size: int,
          progress: bool = False) -> List[float]:
    """Sum of log-probs of each continuation given its context, one context's work done once:
    a context whose continuations' inputs nest (one-token answers, or " B" beside " "+"A")
    takes one forward over the longest; one whose continuations diverge (" yes" / " no" in a
    small vocabulary) runs once into a KV cache, its continuations then as branches on it."""
    groups = _plan(requests, max_len)
    chains, branched = [], []
    for g in groups:
        longest = _chain(g.inputs)
        if longest is None:
            branched.append(g)
        else:
            chains.append((longest, list(zip(g.members, g.inputs))))
    out: List[float] = [0.0] * len(requests)
    bar = progress_bar(len(groups), "scoring", "context", enabled=progress)
    _score_chains(lm, requests, chains, batch_size, out, bar)
    if branched:
        _score_branches(lm, requests, branched, batch_size, lm.shape.seq_length, out, bar)
    bar.close()
    return out


def predict(loglikelihoods: Sequence[float]) -> int:
    """The most likely choice; ties go to the first, as argmax (and lm-eval) break them."""
    return max(range(len(loglikelihoods)), key=lambda k: (loglikelihoods[k], -k))


def evaluate(lm, tokenizer, questions: List[Question], max_len: int, batch_size: int, progress=False):
    requests, owners = [], []
    for qi, q in enumerate(questions):
        encode = lru_cache(maxsize=None)(tokenizer.encode)  # the context once per question
        for c in q.choices:
            requests.append(encode_pair(tokenizer, q.context, " " + c, encode))
            owners.append(qi)
    scores = score(lm, requests, max_len, batch_size, progress)
    per_q: List[List[float]] = [[] for _ in questions]
    for qi, s in zip(owners, scores):
        per_q[qi].append(s)
    results = []
    for q, s in zip(questions, per_q):
        pred = predict(s)
        results.append({"id": q.qid, "group": q.group, "loglikelihoods": s, "prediction": pred, "answer": q.answer,
                        "correct": pred == q.answer})
    return results


def _baselines(rows) -> Tuple[float, float]:
    """(chance: a uniform guess's expected accuracy, majority: always the most common answer)."""
    chance = sum(1 / r["choices"] for r in rows) / len(rows)
    counts: Dict[int, int] = {}
    for r in rows:
        counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    return chance, max(counts.values()) / len(rows)


def table(results) -> Tuple[str, dict]:
    """Accuracy per subject beside two references a score must beat: chance and always
    answering the most common answer (BoolQ is ~62 % "yes")."""
    groups: Dict[str, List[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append({"correct": r["correct"], "answer": r["answer"],
                                                  "choices": len(r["loglikelihoods"])})
    width = max([len(g) for g in groups] + [len("micro average")])
    head = f"{'subject':<{width}}  questions  accuracy    chance  majority"
    lines = [head, "-" * len(head)]

    def row(name, rows):
        acc = sum(r["correct"] for r in rows) / len(rows)
        chance, majority = _baselines(rows)
        lines.append(f"{name:<{width}}  {len(rows):9d}  {acc:8.4f}  {chance:8.4f}  {majority:8.4f}")
        return acc, chance, majority

    per_group = {}
    for g, rows in sorted(groups.items()):
        acc, chance, majority = row(g, rows)
        per_group[g] = {"questions": len(rows), "accuracy": acc, "chance": chance, "majority": majority}
    total = [r for rows in groups.values() for r in rows]
    lines.append("-" * len(head))
    micro, chance, majority = row("micro average", total)
    summary = {"accuracy": micro, "questions": len(total), "chance": chance, "majority": majority,
               "per_group": per_group}
    return "\n".join(lines), summary


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
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


def read_questions(s: settings.Evaluate, skipped: List[str]) -> List[Question]:
    if s.task == "mmlu":
        return mmlu_questions(s.data_path, s.num_fewshot, s.limit, skipped)
    return boolq_questions(s.data_path, s.limit, skipped)


def main(argv=None):
    s = settings.evaluate(build_parser().parse_args(argv))
    skipped: List[str] = []
    questions = read_questions(s, skipped)  # unusable task data is refused before any model loads
    lm, tokenizer = inference.open_checkpoint(s.checkpoint)
    rank = dist.get_rank()
    max_len = min(s.seq_length or lm.shape.seq_length, lm.shape.seq_length)
    t0 = time.time()
    results = evaluate(lm, tokenizer, questions, max_len, s.micro_batch_size, progress=rank == 0)
    elapsed = time.time() - t0
    text, summary = table(results)
    summary.update(task=s.task, num_fewshot=s.num_fewshot, load=s.checkpoint.load, seconds=elapsed,
                   questions_per_s=len(results) / max(elapsed, 1e-9))
    summary["skipped_rows"] = skipped
    if rank == 0 and skipped:
        print(f"skipped {len(skipped)} bad rows (scored the other {len(questions)}):\n"
              + "\n".join(f"  {s}" for s in skipped[:5]) + (f"\n  ... {len(skipped) - 5} more" if len(skipped) > 5
                                                             else ""), flush=True)
    if rank == 0:
        lora_txt = f" + LoRA {s.checkpoint.lora_load}" if s.checkpoint.lora_load else ""
        print(f"\n{s.task} ({s.num_fewshot}-shot), {s.checkpoint.load}{lora_txt}\n{text}\n"
              f"{len(results)} questions in {elapsed:.1f} s ({summary['questions_per_s']:.1f} questions/s)", flush=True)
        if s.output_json:
            Path(s.output_json).write_text(json.dumps({**summary, "predictions": results}, indent=1))
    parallel.destroy()
    return summary, results


if __name__ == "__main__":
    main()
