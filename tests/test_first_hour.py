"""What a new user meets in the first hour: a refusal under torchrun is one line from rank 0
(no rank traceback, torchrun's summary carries it); a launch script's Megatron-LM /
AscendSpeed flags paste in and a contradicting one is refused; checkpoint folders cannot be
clobbered (empty --load starts fresh, --save over another run refused, the metrics file keeps
each iteration once after a resume, no helper process outlives a killed rank); a split with no
tokens is refused instead of hanging."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.train import pretrain, run_settings
from recipes.model import checkpointing
from recipes.errors import BadInput, MissingInput
from tests.helpers.launch import ROOT, env_for_ranks, free_port, run_module, run_torchrun


@pytest.fixture(scope="module")
def data(alpaca_pretrain_data):
    return alpaca_pretrain_data


def _flags(data, *more):
    prefix, tok = data
    return ["--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path", tok, "--seq-length", 64,
            *more]


def _resolve(*flags, world=1):
    args, unknown = pretrain.build_parser().parse_known_args([str(f) for f in flags])
    return run_settings.resolve(args, world=world, passthrough=unknown)


# -- one error path --------------------------------------------------------------------------

def test_refusal_under_torchrun_is_one_line_from_rank_0(data):
    proc = run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 2, "--tensor-model-parallel-size", 3),
                        check=False)
    assert proc.returncode != 0
    rank_lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(rank_lines) == 1 and "--tensor-model-parallel-size 3 does not divide 8 attention heads" in rank_lines[0]
    # torchrun's own summary names the message (its error file), not "error_file: <N/A>" for the root cause
    root_cause = proc.stderr.split("Root Cause")[1]
    assert "traceback : error: TP=3 PP=1 does not fit the model" in root_cause
    # no rank's Python traceback (torchrun's own, of its ChildFailedError, cannot be helped from a rank)
    assert "recipes/" not in proc.stderr.replace("recipes.pretrain", "") and "LayoutError" not in proc.stderr


def test_usage_error_is_one_line_and_debug_shows_the_traceback(data):
    out = run_module("recipes.pretrain", "--model", "llama2-tiny", "--train-iters", 2)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: pretrain.py: the following arguments are required: --data-path (see --help)")
    out = run_module("recipes.pretrain", *_flags(data, "--train-iters", 2, "--tensor-model-parallel-size", 3,
                                                 "--debug"))
    assert out.returncode != 0 and "Traceback" in out.stderr and "LayoutError" in out.stderr


# -- paste-in flags --------------------------------------------------------------------------

ASCENDSPEED_LLAMA2 = ["--use-flash-attn", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                      "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--distributed-backend", "nccl",
                      "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--use-fused-rmsnorm",
                      "--use-fused-swiglu", "--use-fused-rotary-pos-emb", "--use-mcore-models",
                      "--use-rotary-position-embeddings", "--no-position-embedding", "--group-query-attention"]


def test_ascendspeed_flag_set_pastes_in(data):
    plain = _resolve(*_flags(data, "--train-iters", 5))
    pasted = _resolve(*_flags(data, "--train-samples", 40), *ASCENDSPEED_LLAMA2)
    assert pasted == plain  # the same run: tiny's global batch is 8, so 40 samples are 5 iterations
    assert pasted.dist_backend == "gloo"  # nccl means the accelerator's library; the CPU's is gloo


@pytest.mark.parametrize("flags, message", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: LLaMA-2 uses RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute: LLaMA-2 uses rope"),
    (["--distributed-backend", "hccl"], "--distributed-backend hccl: this machine's accelerator (cpu) communicates "
                                        "through gloo"),
    (["--train-iters", 5, "--train-samples", 40], "--train-iters and --train-samples: give one"),
    (["--train-samples", 3], "--train-samples 3 is less than one global batch"),
])
def test_contradicting_flags_are_refused(data, flags, message):
    more = [] if "--train-iters" in flags or "--train-samples" in flags else ["--train-iters", 5]
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        _resolve(*_flags(data, *more, *flags))


# -- checkpoint folders ----------------------------------------------------------------------

def test_empty_load_starts_fresh_and_hf_folder_points_at_the_converter(data, tmp_path, fixtures_dir):
    s = _resolve(*_flags(data, "--train-iters", 2, "--load", tmp_path / "ckpt", "--save", tmp_path / "ckpt"))
    assert s.resume.kind == "fresh" and "starting from scratch" in s.resume.note
    with pytest.raises(BadInput, match="is a HuggingFace model folder; convert it first: python -m converters.hf_to_megatron"):
        _resolve(*_flags(data, "--train-iters", 2, "--load", fixtures_dir / "stories260K"))
    with pytest.raises(MissingInput, match="--finetune needs trained weights"):
        _resolve(*_flags(data, "--train-iters", 2, "--load", tmp_path / "ckpt", "--finetune"))


@pytest.mark.full  # CI time: ~95 s (the refusal itself is checked in settings by test_shared_flags and test_resume_data)
def test_save_over_another_run_is_refused_and_metrics_keep_each_iteration_once(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 6, "--load", ckpt, "--save", ckpt,
                                                   "--save-interval", 3, "--exit-after-iters", 5), nproc=1)
    assert "no checkpoint there yet; starting from scratch" in out and checkpointing.latest_iteration(ckpt) == 5
    assert "done: iterations 1-5 in" in out and "ETA" in out
    # a new run into the folder, without --load: refused, nothing touched
    before = (ckpt / "metrics.jsonl").read_text()
    proc = run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 2, "--save", ckpt), nproc=1, check=False)
    assert proc.returncode != 0 and f"error: --save {ckpt} holds another run's checkpoint (iteration 5)" in proc.stderr
    assert checkpointing.latest_iteration(ckpt) == 5 and (ckpt / "metrics.jsonl").read_text() == before
    # resume from the iteration-3 checkpoint (as after a crash at 5): 4 and 5 are not logged twice
    checkpointing.write_tracker(ckpt, 3)
    out = run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 6, "--load", ckpt, "--save", ckpt,
                                                   "--save-interval", 3), nproc=1)
    assert "dropped 2 records after iteration 3" in out
    its = [json.loads(l)["iteration"] for l in open(ckpt / "metrics.jsonl")]
    assert its == [1, 2, 3, 4, 5, 6]
    # --overwrite lets a fresh run replace it
    run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 2, "--save", ckpt, "--overwrite"), nproc=1)
    assert checkpointing.latest_iteration(ckpt) == 2
    assert [json.loads(l)["iteration"] for l in open(ckpt / "metrics.jsonl")] == [1, 2]


def _children_of(pid: int) -> set:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_no_process_outlives_a_killed_rank(data, tmp_path):
    """kill -9 of the rank after its first save started the checkpoint writer's helpers."""
    cmd = [sys.executable, "-m", "recipes.pretrain", *map(str, _flags(data, "--train-iters", 400, "--save", tmp_path,
                                                                 "--save-interval", 1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for_ranks({"MASTER_PORT": str(free_port())}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    helpers, deadline, log = set(), time.time() + 240, []
    for line in proc.stdout:
        log.append(line)
        helpers |= _children_of(proc.pid)
        if line.startswith("saved ") and "iter_0000003" in line:
            break
        assert time.time() < deadline, "no third save within 240 s"
    else:
        pytest.fail("the run ended before its third save:\n" + "".join(log[-30:]))
    helpers |= _children_of(proc.pid)
    grandchildren = set().union(*(_children_of(h) for h in helpers)) if helpers else set()
    assert helpers, "the save started no helper process (nothing to test)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    survivors = [p for p in helpers | grandchildren if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"alive after the rank was killed: {survivors}"


# -- data ------------------------------------------------------------------------------------

@pytest.mark.full  # CI time: ~85 s
def test_split_without_tokens_is_refused_not_hung(tmp_path, fixtures_dir):
    rows = json.loads((fixtures_dir / "alpaca" / "alpaca_data_sample.json").read_text())[:57]
    src = tmp_path / "small.jsonl"
    src.write_text("".join(json.dumps({"text": r["output"]}) + "\n" for r in rows))
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    out = run_module("recipes.preprocess_data", "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix",
                     tmp_path / "small", "--append-eod")
    assert out.returncode == 0, out.stderr
    prefix = str(tmp_path / "small_text_document")
    proc = run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path",
                        tok, "--tensor-model-parallel-size", 2, "--micro-batch-size", 2, "--global-batch-size", 4,
                        "--seq-length", 64, "--train-iters", 20, check=False, timeout=120)
    assert proc.returncode != 0
    assert (f"error: --data-path {prefix}: --split 949,50,1 gives the test split 0 of its 57 documents, which hold "
            "no token") in proc.stderr, proc.stderr[-2000:]
    ok = run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path",
                      tok, "--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 64, "--train-iters", 2,
                      "--split", "95,5,0", nproc=1, timeout=120)
    assert "done: iterations 1-2" in ok


def test_load_with_another_shape_names_the_flags(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 1, "--save", ckpt), nproc=1)
    proc = run_torchrun("recipes.pretrain", *_flags(data, "--train-iters", 2, "--load", ckpt, "--save", ckpt,
                                                    "--hidden-size", 128), nproc=1, check=False)
    assert proc.returncode != 0 and 'recipes/checkpointing.py"' not in proc.stderr  # no rank traceback
    assert f"error: --load {ckpt}: the checkpoint's tensors do not fit this model" in proc.stderr, proc.stderr[-3000:]
    assert "'hidden_size': 64" in proc.stderr and "drop the shape flags" in proc.stderr
