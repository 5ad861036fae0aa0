"""The DeepSpeed engine (recipes.pretrain --deepspeed) on Megatron-Core's LLaMA-2, CPU, gloo:
ZeRO-1/2/3 and ZeRO-2 at TP=2 against a plain torch AdamW loop, bf16 against megatron's own
bf16 path, recompute through deepspeed.checkpointing with dropout against no recompute,
DeepSpeed's pipeline against one stage, exact resume (fp32 and bf16), and a ZeRO-3
checkpoint carried to this project's format.

DeepSpeed JIT-builds its shared-memory communication op at init_distributed; the tests keep
it in TORCH_EXTENSIONS_DIR under the checkout (.cache/, built once per fresh clone)."""

import json
import os

import pytest
import torch

from recipes.data import preprocess_data
from recipes.train import compare_loss
from tests.helpers.launch import ROOT, run_torchrun

pytestmark = pytest.mark.slow  # multi-process DeepSpeed runs

EXT = {"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("ds")
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    preprocess_data.main(["--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          tok, "--output-prefix", str(out / "alpaca"), "--json-keys", "output", "--append-eod"])
    config = out / "ds.json"  # the stage, dtype and batches come from the flags
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    return {"prefix": str(out / "alpaca_output_document"), "tok": tok, "config": str(config), "dir": out}


def common(data, iters=20, extra=()):
    return ["--model", "llama2-tiny", "--data-path", data["prefix"], "--tokenizer-name-or-path", data["tok"],
            "--train-iters", iters, "--seq-length", 64, "--log-interval", 5, *extra]


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def _ds(data, tmp, name, *flags, nproc=2, iters=20):
    metrics = tmp / f"{name}.jsonl"
    run_torchrun("recipes.pretrain", *common(data, iters), "--deepspeed", "--deepspeed_config", data["config"], *flags,
                 "--metrics-file", metrics, nproc=nproc, env=EXT, timeout=600)
    return _losses(metrics)


# every optimizer setting spelled out, so the reference reads them from the flags, not the recipe
OPTIM = ["--lr", 3e-3, "--min-lr", 3e-4, "--lr-warmup-iters", 3, "--lr-decay-style", "cosine", "--weight-decay", 0.1,
         "--clip-grad", 1.0, "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--adam-eps", 1e-8]


@pytest.fixture(scope="module")
def reference(data):
    """A plain torch AdamW loop in one process, fp32: the same model init and data; its own
    cross entropy on the logits, weight-decay groups and Megatron-LM's lr schedule, written out
    in tests/dist/deepspeed_checks.py, none of the engine's code."""
    out = data["dir"] / "reference.json"
    run_torchrun("deepspeed_checks.py", "reference", out, "--", *common(data, extra=OPTIM), nproc=1, env=EXT)
    return json.loads(out.read_text())


# default CI: ZeRO-2 at TP=2; ZeRO-1, ZeRO-2 and ZeRO-3 at DP=2 in the full tier (CI time; ZeRO-3 at DP=2
# runs by default on the emulated NPU, test_emulated_npu_device.py, against the CPU backend's losses)
@pytest.mark.parametrize("flags", [pytest.param(["--zero-stage", 1], marks=pytest.mark.full),
                                   pytest.param(["--zero-stage", 2], marks=pytest.mark.full),
                                   pytest.param(["--zero-stage", 3], marks=pytest.mark.full),
                                   ["--zero-stage", 2, "--tensor-model-parallel-size", 2]],
                         ids=["zero1_dp2", "zero2_dp2", "zero3_dp2", "zero2_tp2"])
def test_zero_matches_plain_adamw(data, reference, tmp_path, flags):
    """Tolerance 1e-5 absolute on losses ~5-6 over 20 steps: the runs differ in the order of
    fp32 sums (data-parallel gradient averaging, TP partial sums, the reference's cross entropy
    against megatron's), each ~1e-7 relative (fp32's epsilon) per step."""
    losses = _ds(data, tmp_path, "zero", *OPTIM, *flags)
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst <= 1e-5, (worst, losses, reference)


@pytest.mark.full  # ~5 min on 2 cores: bf16 DeepSpeed vs bf16 megatron, step by step
def test_shipped_tiny_config_and_bf16_track_megatron_bf16(data, tmp_path):
    """DeepSpeed's bf16 (ZeRO-1, the shipped llama2-tiny config) against megatron's own bf16
    path (the built-in loop, distributed optimizer), AscendSpeed's criterion: mean relative
    loss error <= 2 %."""
    run_torchrun("recipes.pretrain", *common(data), "--bf16", "--use-distributed-optimizer", "--metrics-file",
                 tmp_path / "megatron.jsonl")
    ds = tmp_path / "ds.jsonl"
    run_torchrun("recipes.pretrain", *common(data), "--bf16", "--deepspeed", "--deepspeed_config",
                 ROOT / "recipes" / "deepspeed_configs" / "llama2-tiny.json", "--metrics-file", ds, env=EXT, timeout=600)
    r = compare_loss.compare(compare_loss.read_losses(ds), compare_loss.read_losses(tmp_path / "megatron.jsonl"))
    assert r["iterations"] == 20 and r["mean_rel"] <= 0.02, r


# DeepSpeed's recompute with megatron's own RNG tracker left alone (the checkpoint routed, the tracker not)
TRACKER_ROUTING = "deepspeed.get_cuda_rng_tracker,deepspeed.model_parallel_cuda_manual_seed"


@pytest.mark.full  # recompute on and off through DeepSpeed, gradients compared
def test_recompute_through_deepspeed_gives_the_same_gradients(data, tmp_path):
    """TP=2 with dropout 0.1: DeepSpeed's activation checkpointing recomputes each layer; with
    megatron's RNG tracker routed to DeepSpeed's, every gradient equals the run without
    recompute bit for bit, with --partition-activations too; without the routing they do not
    (so this test can fail)."""
    base = ["--", *common(data, iters=1), "--deepspeed", "--deepspeed_config", data["config"], "--zero-stage", 0,
            "--tensor-model-parallel-size", 2, "--hidden-dropout", 0.1, "--attention-dropout", 0.1]
    run_torchrun("deepspeed_checks.py", "grads", tmp_path / "plain.pt", *base, env=EXT, timeout=600)
    run_torchrun("deepspeed_checks.py", "grads", tmp_path / "recompute.pt", *base, "--deepspeed-activation-checkpointing",
                 env=EXT, timeout=600)
    run_torchrun("deepspeed_checks.py", "grads", tmp_path / "partitioned.pt", *base,
                 "--deepspeed-activation-checkpointing", "--partition-activations", env=EXT, timeout=600)
    run_torchrun("deepspeed_checks.py", "grads", tmp_path / "unrouted.pt", *base, "--deepspeed-activation-checkpointing",
                 env={**EXT, "ASCEND_PATCHES_DISABLE": TRACKER_ROUTING}, timeout=600)
    plain, recompute, partitioned, unrouted = (torch.load(tmp_path / f"{n}.pt")
                                               for n in ("plain", "recompute", "partitioned", "unrouted"))
    assert set(plain) == set(recompute) == set(partitioned) and len(plain) >= 10
    assert all(torch.equal(plain[n], recompute[n]) and torch.equal(plain[n], partitioned[n]) for n in plain)
    assert not all(torch.equal(plain[n], unrouted[n]) for n in plain)


@pytest.mark.full  # CI time: ~65 s
def test_pipeline_two_stages_equals_one_stage(data, tmp_path):
    one = _ds(data, tmp_path, "one", "--zero-stage", 1, "--no-pipeline-parallel")
    two = _ds(data, tmp_path, "two", "--zero-stage", 1, "--pipeline-model-parallel-size", 2)
    worst = max(abs(a - b) for a, b in zip(one, two))
    assert len(two) == 20 and worst <= 1e-5, (worst, one, two)


def _resume(data, tmp_path, config, *flags):
    """(uninterrupted, stopped at 5 and resumed) losses per iteration, 10 iterations."""
    flags = ["--deepspeed", "--deepspeed_config", config, "--save-interval", 5, *flags]
    run_torchrun("recipes.pretrain", *common(data, 10), *flags, "--save", tmp_path / "full", env=EXT, timeout=600)
    run_torchrun("recipes.pretrain", *common(data, 10), *flags, "--save", tmp_path / "part", "--exit-after-iters", 5,
                 env=EXT, timeout=600)
    out = run_torchrun("recipes.pretrain", *common(data, 10), *flags, "--save", tmp_path / "part", "--load",
                       tmp_path / "part", env=EXT, timeout=600)
    assert "(DeepSpeed, iteration 5)" in out
    return [{json.loads(l)["iteration"]: json.loads(l)["loss"] for l in open(tmp_path / run / "metrics.jsonl")}
            for run in ("full", "part")]


def test_resume_from_deepspeed_checkpoint_is_exact(data, tmp_path):
    full, part = _resume(data, tmp_path, data["config"], "--zero-stage", 2)
    assert part == full  # fp32, every iteration 1..10


@pytest.mark.full  # the longest test (bf16 resume at ZeRO 1-3, 1 and 4 micro-batches, and the drift shown)
def test_bf16_resume_is_exact_and_why(data, tmp_path):
    """bf16 resumes exactly because DeepSpeed reloads its fp32 master partition
    (zero_optimization.load_from_fp32_weights, on by default).  Rebuilding the master weights
    from the saved bf16 weights instead gives the first resumed step exactly and then a drift:
    the signature of the drift first seen in a prototype."""
    full, part = _resume(data, tmp_path / "a", data["config"], "--zero-stage", 1, "--bf16")
    assert part == full
    cfg = json.loads(open(data["config"]).read())
    cfg["zero_optimization"] = {"load_from_fp32_weights": False}
    rebuilt = tmp_path / "rebuilt.json"
    rebuilt.write_text(json.dumps(cfg))
    full, part = _resume(data, tmp_path / "b", rebuilt, "--zero-stage", 1, "--bf16")
    assert all(part[i] == full[i] for i in range(1, 7)), (part, full)  # 6: the step from the loaded weights
    assert all(part[i] != full[i] for i in range(7, 11)), (part, full)


def test_zero3_checkpoint_converts_and_generates_the_trained_logits(data, tmp_path):
    from converters import deepspeed_to_megatron
    from recipes.infer import inference

    ckpt = tmp_path / "zero3"
    run_torchrun("deepspeed_checks.py", "trained_logits", tmp_path / "trained.pt", "--", *common(data, 5),
                 "--deepspeed", "--deepspeed_config", data["config"], "--zero-stage", 3, "--save", ckpt, env=EXT,
                 timeout=600)
    deepspeed_to_megatron.main(["--input-model-dir", str(ckpt), "--output-model-dir", str(tmp_path / "mg")])
    trained = torch.load(tmp_path / "trained.pt")
    out = run_torchrun("converted_checks.py", 1, 1, "logits_of", tmp_path / "mg", tmp_path / "trained.pt", nproc=1)
    err = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])["max_abs"]
    assert err < 1e-5 and trained["logits"].std() > 0.1, (err, trained["logits"].std())  # measured: 0.0, bit for bit
