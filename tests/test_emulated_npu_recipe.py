"""recipes.pretrain on the emulated NPU (ASCEND_PATCHES_BACKEND=npu, tests/npu_emulation on
PYTHONPATH), as a user starts it with torchrun: it stopped at its first log line before
(``torch.npu.get_device_name`` missing from the emulation).  Its ranks talk through the
emulated "hccl", whose point-to-point rules are HCCL's (the pipeline's activations at PP=2),
and its layers take the emulated torch_npu kernels.

The emulated NPU is a device of its own (``torch_npu/device.py``): the model, its gradient
buffers, optimizer state and every batch must be on ``npu``, or an op mixing devices raises.

Reference: the same run on the CPU backend (gloo, torch's ops), the NPU run initialised as the
CPU's (``--use-cpu-initialization``) and moved to the device.  Every loss and gradient norm
within 1e-5 relative, fp32: the emulated kernels compute the same sums in another order
(measured below 1e-6).  A resume with the distributed optimizer (DP=2), initialised on the
device, equals the uninterrupted emulated run bit for bit.
"""

import json

import pytest

from tests.conftest import emulated_npu_env
from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow


def _env(backend: str) -> dict:
    if backend == "cpu":
        return {}
    return emulated_npu_env(EMULATED_HCCL_P2P_TIMEOUT_S="60")


def _run(data, save, backend, *flags, iters=6):
    prefix, tok = data
    return run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path",
                        tok, "--train-iters", iters, "--log-interval", 3, "--seq-length", 64, "--save", save,
                        "--hidden-dropout", 0.1, *flags, env=_env(backend))


def _records(save):
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, open(save / "metrics.jsonl"))}


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", 2],
                                    pytest.param(["--pipeline-model-parallel-size", 2], marks=pytest.mark.full)],
                         ids=["tp2", "pp2"])  # pp2 in the full tier (CI time); its p2p rules: test_context_parallel
def test_the_recipe_on_the_emulated_npu_equals_the_cpu(alpaca_pretrain_data, tmp_path, layout):
    cpu = tmp_path / "cpu"
    _run(alpaca_pretrain_data, cpu, "cpu", *layout)
    # the CPU's weights (Megatron-LM's --use-cpu-initialization), then moved to the device
    out = _run(alpaca_pretrain_data, tmp_path / "npu", "npu", *layout, "--use-cpu-initialization")
    assert "backend: npu" in out and "torch.distributed backend: hccl" in out, out[-2000:]
    assert "shard), on npu:0" in out, out[-2000:]
    assert "MFU n/a (no cited peak for device 'emulated NPU (the CPU)'" in out
    want, got = _records(cpu), _records(tmp_path / "npu")
    assert sorted(got) == list(range(1, 7))
    bad = [(i, got[i], want[i]) for i in want if any(abs(a - b) > 1e-5 * abs(b) for a, b in zip(got[i], want[i]))]
    assert bad == []


def test_the_distributed_optimizer_resumes_exactly_on_the_emulated_npu(alpaca_pretrain_data, tmp_path):
    """DP=2, megatron's distributed optimizer over torch's fused AdamW, dropout 0.1, initialised
    on the device: it learns (the held-out validation loss at 6 below its value at 3); stopped at
    3 (its save) and resumed, every iteration equals the uninterrupted run, validation included.
    With overlapped gradient reduction and parameter gather and full recomputation (whose
    recomputed forward draws dropout from the restored device generator) the run is the same
    too, bit for bit."""
    flags = ["--use-distributed-optimizer", "--save-interval", 3, "--eval-interval", 3]
    _run(alpaca_pretrain_data, tmp_path / "full", "npu", *flags)
    _run(alpaca_pretrain_data, tmp_path / "part", "npu", *flags, "--exit-after-iters", 3)
    out = _run(alpaca_pretrain_data, tmp_path / "part", "npu", *flags, "--load", tmp_path / "part")
    assert "(iteration 3)" in out and "DP=2" in out and "shard), on npu:0" in out
    full = _records(tmp_path / "full")
    assert _records(tmp_path / "part") == full and sorted(full) == list(range(1, 7))
    val = {r["iteration"]: r["val_loss"] for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl"))
           if "val_loss" in r}
    resumed = {r["iteration"]: r["val_loss"] for r in map(json.loads, open(tmp_path / "part" / "metrics.jsonl"))
               if "val_loss" in r}
    assert sorted(val) == [3, 6] and val[6] < val[3] - 0.05 and resumed == val, (val, resumed)
    _run(alpaca_pretrain_data, tmp_path / "memory", "npu", *flags, "--overlap-grad-reduce", "--overlap-param-gather",
         "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1)
    assert _records(tmp_path / "memory") == full
