"""recipes.pretrain over 2 CPU processes on real text (Alpaca responses, stories260K's
512-piece tokenizer): TP=2, DP=2 (distributed optimizer), PP=2 and interleaved PP learn;
resume equals an uninterrupted run exactly (fp32); a save killed midway leaves the previous
checkpoint as "latest" and loadable; a TP=2 checkpoint loads at TP=1; a NaN loss stops the
run naming iteration and rank."""

import json
import shutil
import sys

import pytest

from recipes.data import preprocess_data
from recipes.model import checkpointing
from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process runs


@pytest.fixture(scope="module")
def data(alpaca_pretrain_data):
    return alpaca_pretrain_data


def common(data, iters=20):
    prefix, tok = data
    return ["--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path", tok,
            "--train-iters", iters, "--log-interval", 5, "--seq-length", 64]


def losses(metrics_file):
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(metrics_file))}


@pytest.fixture(scope="module")
def tp2_run(data, tmp_path_factory):
    save = tmp_path_factory.mktemp("tp2")
    out = run_torchrun("recipes.pretrain", *common(data), "--tensor-model-parallel-size", 2, "--save", save,
                       "--save-interval", 10, "--eval-interval", 10, "--eval-iters", 1)
    return save, out


def test_tp2_learns_and_logs_throughput(tp2_run):
    save, out = tp2_run
    recs = [json.loads(l) for l in open(save / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == list(range(1, 21))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0, [r["loss"] for r in recs]
    for key in ("lr", "grad_norm", "tokens_per_s_per_device", "tflops_per_device", "mfu"):
        assert recs[-1][key] > 0
    assert "val_loss" in recs[9] and "val_loss" in recs[19]
    assert "TP=2 PP=1 DP=1" in out and "tokens/s/device" in out and "MFU" in out
    assert checkpointing.latest_iteration(save) == 20
    saved_args = checkpointing.load_args(save)
    assert saved_args["shape"]["num_layers"] == 2 and saved_args["tensor_model_parallel_size"] == 2
    # what a resume must not change (tests/test_resume_data.py)
    assert {k: saved_args["data"][k] for k in ("seed", "seq_length", "split")} == {"seed": 1234, "seq_length": 64,
                                                                                 "split": "949,50,1"}


# DP=2 with the distributed optimizer learns in test_distributed_optimizer_saves_and_resumes_exactly
@pytest.mark.parametrize("layout", [
    ["--pipeline-model-parallel-size", 2],
    ["--pipeline-model-parallel-size", 2, "--num-layers", 4, "--num-layers-per-virtual-pipeline-stage", 1],
], ids=["pp2", "pp2_interleaved"])
def test_other_layouts_learn(data, tmp_path, layout):
    run_torchrun("recipes.pretrain", *common(data), *layout, "--metrics-file", tmp_path / "m.jsonl")
    l = losses(tmp_path / "m.jsonl")
    assert len(l) == 20 and l[20] < l[1] - 1.0, l


# on Python 3.11 in the full tier (CI time): test_mid_run_checkpoint_with_dropout_resumes_exactly resumes the same
# TP=2 run with dropout on from a mid-run save; the 3.12 job runs this one
@(pytest.mark.full if sys.version_info < (3, 12) else pytest.mark.slow)
def test_resume_equals_uninterrupted(data, tp2_run, tmp_path):
    save, _ = tp2_run
    run_torchrun("recipes.pretrain", *common(data), "--tensor-model-parallel-size", 2, "--save", tmp_path,
                 "--save-interval", 10, "--eval-interval", 10, "--eval-iters", 1, "--exit-after-iters", 10)
    assert checkpointing.latest_iteration(tmp_path) == 10
    out = run_torchrun("recipes.pretrain", *common(data), "--tensor-model-parallel-size", 2, "--save", tmp_path,
                       "--load", tmp_path, "--save-interval", 10, "--eval-interval", 10, "--eval-iters", 1)
    assert "loaded" in out and "(iteration 10)" in out
    full, resumed = losses(save / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    assert full == resumed  # exact, every iteration 1..20, fp32 on CPU


def _resume_from(data, tmp_path, flags, stop: int, crash_back_to: int = None):
    """The run stopped after ``stop`` iterations (``--exit-after-iters``) and resumed; with
    ``crash_back_to``, the exit's checkpoint is removed and "latest" points at that earlier
    mid-run save, as a crash after it leaves a run.  The resumed run's metrics."""
    run_torchrun("recipes.pretrain", *common(data), *flags, "--save", tmp_path, "--exit-after-iters", stop)
    if crash_back_to is not None:
        shutil.rmtree(checkpointing.iter_dir(tmp_path, stop))
        checkpointing.write_tracker(tmp_path, crash_back_to)
    out = run_torchrun("recipes.pretrain", *common(data), *flags, "--save", tmp_path, "--load", tmp_path)
    assert f"(iteration {crash_back_to or stop})" in out
    return losses(tmp_path / "metrics.jsonl")


DROPOUT = ["--tensor-model-parallel-size", 2, "--hidden-dropout", 0.1, "--attention-dropout", 0.1, "--save-interval", 7]


def test_mid_run_checkpoint_with_dropout_resumes_exactly(data, tmp_path):
    """TP=2, dropout 0.1, saves every 7: a run stopped after 16 whose last save (16) is gone
    resumes from 14's and equals the uninterrupted run bit for bit.  The RNG state a mid-run
    save writes is the state the next step starts from (the CPU's peak-rate measurement at a
    run's start drew its operands from dropout's stream and shifted it after every resume)."""
    run_torchrun("recipes.pretrain", *common(data), *DROPOUT, "--save", tmp_path / "full")
    full = losses(tmp_path / "full" / "metrics.jsonl")
    resumed = _resume_from(data, tmp_path / "crashed", DROPOUT, stop=16, crash_back_to=14)
    assert resumed == full


@pytest.fixture(scope="module")
def distopt_run(data, tmp_path_factory):
    """DP=2 with the distributed optimizer, 20 iterations, saving every 10."""
    save = tmp_path_factory.mktemp("dp2_distopt")
    run_torchrun("recipes.pretrain", *common(data), "--use-distributed-optimizer", "--save", save,
                 "--save-interval", 10)
    return save


def test_distributed_optimizer_saves_and_resumes_exactly(data, distopt_run, tmp_path):
    """--use-distributed-optimizer (ZeRO-1 over DP=2): the save is written (dp_reshardable; the
    default sharding megatron picks is refused by its torch_dist writer) and a resume from
    iteration 10 equals the uninterrupted run, every iteration bit for bit."""
    full = losses(distopt_run / "metrics.jsonl")
    assert len(full) == 20 and full[20] < full[1] - 1.0, full
    assert _resume_from(data, tmp_path, ["--use-distributed-optimizer", "--save-interval", 10], stop=10) == full


def test_overlapped_reduction_and_gather_give_the_same_losses_and_resume_exactly(data, distopt_run, tmp_path):
    """--overlap-grad-reduce and --overlap-param-gather (DP=2, distributed optimizer): stopped at
    10 and resumed, with both on throughout; all 20 losses equal the plain run's bit for bit: the
    first 10 show the overlap changes nothing, the last 10 that its resume is exact (the save
    forces the gather the next forward would have waited for)."""
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--save-interval", 10]
    assert _resume_from(data, tmp_path, flags, stop=10) == losses(distopt_run / "metrics.jsonl")


@pytest.mark.full  # three more runs per layout; DP=2 above is the default tier's
@pytest.mark.parametrize("layout, nproc", [(["--tensor-model-parallel-size", 2], 2),
                                           (["--pipeline-model-parallel-size", 2], 2),
                                           (["--tensor-model-parallel-size", 2], 4)], ids=["tp2", "pp2", "tp2_dp2"])
def test_distributed_optimizer_resumes_exactly_in_other_layouts(data, tmp_path, layout, nproc):
    flags = ["--use-distributed-optimizer", *layout, "--save-interval", 10]
    run_torchrun("recipes.pretrain", *common(data), *flags, "--save", tmp_path / "full", nproc=nproc)
    run_torchrun("recipes.pretrain", *common(data), *flags, "--save", tmp_path / "part", "--exit-after-iters", 10,
                 nproc=nproc)
    run_torchrun("recipes.pretrain", *common(data), *flags, "--save", tmp_path / "part", "--load", tmp_path / "part",
                 nproc=nproc)
    assert losses(tmp_path / "part" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")


@pytest.mark.full  # four more runs; the default tier resumes at the same size
def test_distributed_optimizer_checkpoint_loads_at_another_data_parallel_size(data, distopt_run, tmp_path):
    """The DP=2 checkpoint of iteration 20 continued for 2 iterations at DP=2 and at DP=1 (the
    same global batch: DP=1 accumulates both micro-batches), and DP=1's checkpoint back at DP=2:
    the same losses to 1e-6 relative (fp32; only the order of the data-parallel sum differs,
    measured ~5e-8), so weights, Adam's moments and step, and the data position all moved."""
    flags = [*common(data, iters=22), "--use-distributed-optimizer", "--log-interval", 1]
    for n in (2, 1):
        shutil.copytree(distopt_run, tmp_path / f"dp{n}", ignore=shutil.ignore_patterns("metrics.jsonl"))
        run_torchrun("recipes.pretrain", *flags, "--load", tmp_path / f"dp{n}", "--save", tmp_path / f"dp{n}",
                     nproc=n)
    two, one = losses(tmp_path / "dp2" / "metrics.jsonl"), losses(tmp_path / "dp1" / "metrics.jsonl")
    assert sorted(two) == sorted(one) == [21, 22]
    back = [*common(data, iters=23), "--use-distributed-optimizer"]
    for n in (2, 1):
        run_torchrun("recipes.pretrain", *back, "--load", tmp_path / f"dp{n}", "--save", tmp_path / f"dp{n}")
    two.update(losses(tmp_path / "dp2" / "metrics.jsonl"))
    one.update(losses(tmp_path / "dp1" / "metrics.jsonl"))
    assert sorted(one) == [21, 22, 23]
    assert all(abs(one[i] - two[i]) / two[i] < 1e-6 for i in one), (one, two)


def test_distributed_optimizer_checkpoint_exports_to_hf_and_loads_for_inference(distopt_run, tmp_path):
    """converters.megatron_to_hf reads the model out of a --use-distributed-optimizer
    checkpoint (the optimizer's dp_reshardable shards beside it), and the inference loader
    recipes.generate and recipes.evaluate use loads it: its logits equal transformers' on the
    export, fp32 (1e-4 absolute: the two sum in different orders; logits are of order 10)."""
    from converters import megatron_to_hf

    megatron_to_hf.main(["--input-model-dir", str(distopt_run), "--output-model-dir", str(tmp_path / "hf")])
    out = run_torchrun("converted_checks.py", 1, 1, "logits", distopt_run, tmp_path / "hf", nproc=1)
    (err, scale), = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]).values()
    assert err < 1e-4 and scale > 1, (err, scale)


def test_killed_save_leaves_previous_checkpoint(data, tmp_path):
    proc = run_torchrun("pretrain_with_faults.py", *common(data), "--save", tmp_path, "--save-interval", 10,
                        env={"FAULT": "crash_in_save", "SAVE_CRASH_ITER": "20"}, check=False)
    assert proc.returncode != 0
    assert checkpointing.latest_iteration(tmp_path) == 10
    assert (tmp_path / "iter_0000020.tmp").is_dir() and not (tmp_path / "iter_0000020").exists()
    out = run_torchrun("recipes.pretrain", *common(data, iters=12), "--save", tmp_path, "--load", tmp_path)
    assert "(iteration 10)" in out and checkpointing.latest_iteration(tmp_path) == 12


def test_tp2_checkpoint_loads_at_tp1(data, tp2_run, tmp_path):
    save, _ = tp2_run
    for tp, name in ((2, "a"), (1, "b")):
        run_torchrun("recipes.pretrain", *common(data, iters=1), "--tensor-model-parallel-size", tp, "--load", save,
                     "--finetune", "--metrics-file", tmp_path / f"{name}.jsonl", "--lr", 0.0, "--min-lr", 0.0)
    a, b = losses(tmp_path / "a.jsonl"), losses(tmp_path / "b.jsonl")
    assert abs(a[1] - b[1]) / a[1] < 1e-5, (a, b)
    assert a[1] < 6.0  # the trained weights were loaded (a fresh model starts at ~ln 512 = 6.24)


def test_nan_loss_stops_with_iteration_and_rank(data, tmp_path):
    proc = run_torchrun("pretrain_with_faults.py", *common(data), "--save", tmp_path, "--save-interval", 2,
                        env={"FAULT": "nan", "NAN_ITER": "3", "NMB": "1"}, check=False)  # DP=2: 1 micro-batch each
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "iteration 3: loss is nan on rank" in text
    assert checkpointing.latest_iteration(tmp_path) == 2


@pytest.mark.full  # two more TP=2 runs against the fp32 one
@pytest.mark.parametrize("dtype", ["--bf16", "--fp16"])
def test_half_precision_tracks_fp32_within_the_seeds_threshold(data, tp2_run, tmp_path, dtype):
    """bf16 (fp32 main weights) and fp16 (dynamic loss scaling) against the fp32 run, judged
    as AscendSpeed judged NPU against GPU: mean relative loss error <= 2 %."""
    save, _ = tp2_run
    run_torchrun("recipes.pretrain", *common(data), "--tensor-model-parallel-size", 2, dtype,
                 "--metrics-file", tmp_path / "m.jsonl")
    from recipes.train import compare_loss

    r = compare_loss.compare(compare_loss.read_losses(tmp_path / "m.jsonl"), compare_loss.read_losses(save / "metrics.jsonl"))
    assert r["iterations"] == 20 and r["mean_rel"] <= 0.02, r


@pytest.mark.full  # interleaved PP resume (plain PP2 learning and plain resume stay in the default tier)
def test_interleaved_pipeline_resume_equals_uninterrupted(data, tmp_path):
    """Virtual pipeline chunks are saved as model0/model1 (Megatron-LM's keys) and restored."""
    vpp = ["--pipeline-model-parallel-size", 2, "--num-layers", 4, "--num-layers-per-virtual-pipeline-stage", 1,
           "--save-interval", 5]
    full, part = tmp_path / "full", tmp_path / "part"
    run_torchrun("recipes.pretrain", *common(data, iters=10), *vpp, "--save", full)
    run_torchrun("recipes.pretrain", *common(data, iters=10), *vpp, "--save", part, "--exit-after-iters", 5)
    out = run_torchrun("recipes.pretrain", *common(data, iters=10), *vpp, "--save", part, "--load", part)
    assert "(iteration 5)" in out
    assert losses(full / "metrics.jsonl") == losses(part / "metrics.jsonl")


def test_instruction_dataset_trains(fixtures_dir, tmp_path):
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    preprocess_data.preprocess(preprocess_data.build_parser().parse_args([
        "--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path", tok,
        "--output-prefix", str(tmp_path / "sft"), "--handler-name", "GeneralInstructionHandler", "--seq-length", "128"]))
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", tmp_path / "sft", "--is-instruction-dataset",
                 "--tokenizer-name-or-path", tok, "--train-iters", 20, "--seq-length", 128,
                 "--metrics-file", tmp_path / "m.jsonl", "--eval-interval", 10, "--eval-iters", 1)
    recs = [json.loads(l) for l in open(tmp_path / "m.jsonl")]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0 and "val_loss" in recs[-1]
