"""The emulated NPU as a device of its own (tests/npu_emulation/torch_npu/device.py), checked
against torch's device rules, and the recipes on it.

- What it refuses and allows (tests/dist/emulated_device_checks.py, 2 ranks on its "hccl"):
  each rule is torch's own for a CUDA tensor, or torch_npu's for an NPU one.
- The built-in engine after a step: every parameter, main_grad and optimizer state on npu
  (bench/placement_check.py).  On the recipes before the fix (the model built with
  use_cpu_initialization and left on the host) this run stops at the first layer: a torch_npu
  kernel handed a CPU tensor.
- TP=2 greedy generation on it gives the CPU backend's tokens, token for token.
"""

import json

import pytest

from tests.conftest import emulated_npu_env
from tests.helpers.launch import ROOT, run_torchrun

pytestmark = pytest.mark.slow



def _npu_env():
    return emulated_npu_env(EMULATED_HCCL_P2P_TIMEOUT_S="60")


def test_the_emulated_npu_refuses_what_hardware_refuses():
    out = run_torchrun("emulated_device_checks.py", env=_npu_env())
    results = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert results == {name: "ok" for name in results} and len(results) == 12, results


def test_every_parameter_gradient_and_optimizer_state_is_on_the_npu(alpaca_pretrain_data):
    prefix, tok = alpaca_pretrain_data
    # under torchrun, as one rank: its own rendezvous, not the test session's process group
    out = run_torchrun(str(ROOT / "bench" / "placement_check.py"), "--data-path", prefix, "--tokenizer-name-or-path",
                       tok, nproc=1, env=_npu_env())
    assert "placement: every tensor on npu" in out, out[-3000:]
    assert "parameter: {'npu': 15}" in out and "main_grad: {'npu': 15}" in out, out[-3000:]
    assert "optimizer state: {'npu': 45}" in out, out[-3000:]  # exp_avg, exp_avg_sq, step per parameter


def test_tp2_greedy_generation_on_the_npu_gives_the_cpus_tokens(stories_sft, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe cat sat\nLily and Ben went to the park. They\n")
    outs = {}
    for backend, env in (("cpu", None), ("npu", _npu_env())):
        run_torchrun("recipes.generate", "--load", stories_sft / "base", "--tensor-model-parallel-size", 2,
                     "--prompt-file", prompts, "--greedy", "--max-new-tokens", 24, "--output-json",
                     tmp_path / f"{backend}.json", env=env)
        outs[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert [r["tokens"] for r in outs["npu"]] == [r["tokens"] for r in outs["cpu"]]
    assert all(len(r["tokens"]) == 24 for r in outs["cpu"])


def _deepspeed_losses(data, tmp_path, name, env, *flags):
    prefix, tok = data
    config = tmp_path / "ds.json"  # the stage, dtype and batches come from the flags
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    metrics = tmp_path / f"{name}.jsonl"
    out = run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path",
                       tok, "--train-iters", 6, "--seq-length", 64, "--log-interval", 3, "--deepspeed",
                       "--deepspeed_config", config, "--use-cpu-initialization", "--metrics-file", metrics, *flags,
                       env={"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), **(env or {})})
    return out, [json.loads(line)["loss"] for line in open(metrics)]


@pytest.mark.parametrize("flags", [pytest.param(["--zero-stage", 1], marks=pytest.mark.full), ["--zero-stage", 3],
                                   pytest.param(["--zero-stage", 2, "--tensor-model-parallel-size", 2],
                                                marks=pytest.mark.full)],  # CI time: ~1 min each
                         ids=["zero1_dp2", "zero3_dp2", "zero2_tp2"])
def test_deepspeed_through_its_npu_accelerator_gives_the_cpus_losses(alpaca_pretrain_data, tmp_path, flags):
    """DeepSpeed picks its own NPU accelerator (it imports torch_npu) and runs ZeRO on npu
    tensors over "hccl"; its losses are the CPU backend's, 1e-5 relative (fp32; the emulated
    kernels sum in another order).  ASCEND_HOME_PATH is what CANN's set_env.sh exports: DeepSpeed's
    NPU op builders read it (an empty folder: no op is built, DS_BUILD_OPS=0)."""
    _, cpu = _deepspeed_losses(alpaca_pretrain_data, tmp_path, "cpu", None, *flags)
    out, npu = _deepspeed_losses(alpaca_pretrain_data, tmp_path, "npu", {**_npu_env(), "ASCEND_HOME_PATH": str(tmp_path)},
                                 *flags)
    assert "DeepSpeed accelerator: npu (NPU_Accelerator), communication backend hccl" in out, out[-3000:]
    assert "shard), on npu:0" in out
    assert len(npu) == 6 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(npu, cpu)), (npu, cpu)
