"""lm-evaluation-harness as the outside reference: local task files that reproduce this
project's MMLU / BoolQ prompts from the fixtures, run with lm-eval's HF backend."""

import csv
import json
from pathlib import Path

LETTERS = ["A", "B", "C", "D"]


def _write_jsonl(path: Path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def mmlu_tasks(mmlu_dir: Path, out: Path, limit=None):
    """One lm-eval task per subject; returns {task_name: subject}."""
    names = {}
    for test in sorted((mmlu_dir / "test").glob("*_test.csv")):
        subject = test.name[:-len("_test.csv")]
        for split in ("test", "dev"):
            rows = list(csv.reader(open(mmlu_dir / split / f"{subject}_{split}.csv", newline="", encoding="utf-8")))
            if split == "test" and limit:
                rows = rows[:limit]
            _write_jsonl(out / f"{subject}_{split}.jsonl",
                         [dict(zip(["question", *LETTERS, "answer"], r)) for r in rows])
        name = f"local_mmlu_{subject}"
        spec = {
            "task": name, "dataset_path": "json", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(out / f"{subject}_test.jsonl"),
                                              "dev": str(out / f"{subject}_dev.jsonl")}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
            "doc_to_choice": LETTERS, "doc_to_target": "{{['A','B','C','D'].index(answer)}}",
            "target_delimiter": " ", "fewshot_delimiter": "\n\n", "metric_list": [{"metric": "acc"}],
        }
        (out / f"{name}.yaml").write_text(json.dumps(spec, indent=1))  # JSON is YAML
        names[name] = subject
    return names


def boolq_task(jsonl: Path, out: Path, limit=None):
    rows = [json.loads(l) for l in open(jsonl, encoding="utf-8") if l.strip()][:limit]
    _write_jsonl(out / "boolq.jsonl", rows)
    spec = {"task": "local_boolq", "dataset_path": "json", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"validation": str(out / "boolq.jsonl")}},
            "test_split": "validation",
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_choice": ["no", "yes"],
            "doc_to_target": "{{1 if label in ['true', 'True', True, 1] else 0}}",
            "target_delimiter": " ", "metric_list": [{"metric": "acc"}]}
    (out / "local_boolq.yaml").write_text(json.dumps(spec, indent=1))
    return {"local_boolq": "boolq"}


def run(hf_dir: Path, task_dir: Path, tasks, num_fewshot: int, model: str = "hf", model_args: str = None):
    """Per task: [(loglikelihoods per choice, target)] in document order, and accuracy.  By
    default lm-eval's HF backend on ``hf_dir``; ``model``/``model_args`` name another of its
    backends (``local-completions`` against a server)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=model, model_args=model_args or f"pretrained={hf_dir},dtype=float32",
                                  tasks=list(tasks), num_fewshot=num_fewshot, batch_size=8, device="cpu",
                                  log_samples=True, task_manager=TaskManager(include_path=str(task_dir)))
    out = {}
    for name in tasks:
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        out[name] = {"acc": res["results"][name]["acc,none"],
                     "samples": [([float(r[0]) for r in s["filtered_resps"]], int(s["target"])) for s in samples]}
    return out
