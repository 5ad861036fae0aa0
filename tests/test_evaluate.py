"""recipes.evaluate against lm-evaluation-harness (HF backend, on the HF export of the same
model, local task files reproducing the same prompts): per-question predictions identical,
accuracies equal.  Log-likelihoods agree to 1e-4 (fp32; two different forward
implementations, Megatron's and HF's)."""

import json

import pytest

from converters import hf_to_megatron, megatron_to_hf
from recipes.infer import evaluate
from tests.conftest import emulated_npu_env
from tests.helpers.launch import run_torchrun
from tests.helpers import lm_eval_reference as ref  # needs lm-eval: the [test] extra installs it

pytestmark = pytest.mark.slow  # multi-process runs


@pytest.fixture(scope="module")
def model(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp("eval")
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir",
                         str(root / "mg")])
    megatron_to_hf.main(["--input-model-dir", str(root / "mg"), "--output-model-dir", str(root / "hf")])
    return root


def _ours(model, questions, single_process_group):
    from recipes.infer import inference
    from recipes.data.tokenizer import load_tokenizer

    lm = inference.load(model / "mg", 1, 1)
    tok = load_tokenizer(str(model / "hf"))  # lm-eval tokenizes with the export's tokenizer too
    return evaluate.evaluate(lm, tok, questions, lm.shape.seq_length, batch_size=16)


def _compare(ours, theirs):
    assert len(ours) == len(theirs)
    worst = 0.0
    for o, (ll, target) in zip(ours, theirs):
        assert o["answer"] == target, o["id"]
        worst = max(worst, max(abs(a - b) for a, b in zip(o["loglikelihoods"], ll)))
        best = max(range(len(ll)), key=lambda k: (ll[k], -k))
        assert o["prediction"] == best, (o["id"], o["loglikelihoods"], ll)
    assert worst < 1e-4, worst
    return worst


@pytest.mark.parametrize("shots,limit", [pytest.param(0, None, marks=pytest.mark.full), (5, 40)])  # all MMLU rows: full tier
def test_mmlu_agrees_with_lm_eval(model, fixtures_dir, tmp_path, single_process_group, shots, limit):
    tasks = ref.mmlu_tasks(fixtures_dir / "mmlu" / "data", tmp_path, limit=limit)
    theirs = ref.run(model / "hf", tmp_path, tasks, shots)
    questions = evaluate.mmlu_questions(fixtures_dir / "mmlu" / "data" / "test", shots, limit)
    ours = _ours(model, questions, single_process_group)
    _, summary = evaluate.table(ours)
    for task, subject in tasks.items():
        mine = [r for r in ours if r["group"] == subject]
        worst = _compare(mine, theirs[task]["samples"])
        assert summary["per_group"][subject]["accuracy"] == pytest.approx(theirs[task]["acc"], abs=1e-12)
        print(f"MMLU {shots}-shot {subject}: {len(mine)} questions, acc {theirs[task]['acc']:.4f} (both), "
              f"max |loglik diff| {worst:.2e}")


@pytest.mark.full  # CI time: ~55 s; MMLU against lm-eval stays, and BoolQ's TP=2 branches against TP=1
def test_boolq_agrees_with_lm_eval_in_both_schemas(model, fixtures_dir, tmp_path, single_process_group):
    sg = fixtures_dir / "boolq" / "superglue_BoolQ_val_first200.jsonl"
    orig = fixtures_dir / "boolq" / "DERIVED_boolq_dev_format_first200.jsonl"
    tasks = ref.boolq_task(sg, tmp_path)
    theirs = ref.run(model / "hf", tmp_path, tasks, 0)["local_boolq"]
    q_sg, q_orig = evaluate.boolq_questions(sg), evaluate.boolq_questions(orig)
    assert [q.context for q in q_sg] == [q.context for q in q_orig]
    assert [q.answer for q in q_sg] == [q.answer for q in q_orig]
    ours = _ours(model, q_orig, single_process_group)
    worst = _compare(ours, theirs["samples"])
    _, summary = evaluate.table(ours)
    assert summary["accuracy"] == pytest.approx(theirs["acc"], abs=1e-12)
    print(f"BoolQ: 200 questions, acc {theirs['acc']:.4f} (both), max |loglik diff| {worst:.2e}")


def test_evaluate_cli_at_tp2_gives_the_same_predictions(model, fixtures_dir, tmp_path, single_process_group):
    out = tmp_path / "tp2.json"
    stdout = run_torchrun("recipes.evaluate", "--task", "mmlu", "--task-data-path",
                          fixtures_dir / "mmlu" / "data" / "test", "--load", model / "mg", "--tokenizer-name-or-path",
                          model / "hf", "--num-fewshot", "1", "--limit", "25", "--output-json", out)
    assert "micro average" in stdout and "anatomy" in stdout
    tp2 = json.loads(out.read_text())
    questions = evaluate.mmlu_questions(fixtures_dir / "mmlu" / "data" / "test", 1, 25)
    tp1 = _ours(model, questions, single_process_group)
    assert [r["prediction"] for r in tp2["predictions"]] == [r["prediction"] for r in tp1]
    assert tp2["questions"] == 100


def test_boolq_branches_at_tp2_on_the_emulated_npu_give_the_cpus_scores(model, fixtures_dir, tmp_path,
                                                                        single_process_group):
    """BoolQ's " yes" / " no" diverge at their first token in stories260K's vocabulary, so they
    run as KV-cached branches: at TP=2 (megatron's cache split by heads) on the emulated NPU
    device (model, batches, masks and KV cache on npu, or an op mixing devices raises) as at
    TP=1 on the CPU."""
    data = fixtures_dir / "boolq" / "superglue_BoolQ_val_first200.jsonl"
    out = tmp_path / "tp2.json"
    run_torchrun("recipes.evaluate", "--task", "boolq", "--task-data-path", data, "--load", model / "mg",
                 "--tokenizer-name-or-path", model / "hf", "--limit", "24", "--output-json", out,
                 env=emulated_npu_env())
    tp2 = json.loads(out.read_text())["predictions"]
    tp1 = _ours(model, evaluate.boolq_questions(data, 24), single_process_group)
    assert [r["prediction"] for r in tp2] == [r["prediction"] for r in tp1]
    worst = max(abs(a - b) for x, y in zip(tp2, tp1) for a, b in zip(x["loglikelihoods"], y["loglikelihoods"]))
    assert worst < 1e-4, worst


def test_bad_task_data_is_named(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"x_test.csv row 1: expected question,A,B,C,D,answer"):
        evaluate.mmlu_questions(tmp_path / "test")
    with pytest.raises(FileNotFoundError, match="needs x_dev.csv"):
        evaluate.mmlu_questions(tmp_path / "test", num_fewshot=1)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl row 1: label 'maybe'"):
        evaluate.boolq_questions(bad)
