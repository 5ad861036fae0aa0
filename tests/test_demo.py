"""The README's main job: preprocess the shipped sample, pretrain TP=2 over 2 CPU
processes, loss falls, patch report printed, checkpoint written."""

import re

import pytest

from tests.conftest import emulated_npu_env
from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process runs


@pytest.mark.parametrize("backend", ["cpu", pytest.param("npu", marks=pytest.mark.full)])  # npu: ~3 min
def test_demo_preprocesses_and_pretrains_with_tp2(tmp_path, backend):
    """On the emulated NPU device too: every step of the demo (pretrain, generation, LoRA and
    its merge) with the model and batches on npu, or an op mixing devices raises."""
    env = None if backend == "cpu" else emulated_npu_env()
    text = run_torchrun("recipes.demo", "--train-iters", "30", "--out", tmp_path, timeout=600, env=env)
    assert re.search(r"patches: \d+ applied", text) and "TP=2 PP=1" in text
    assert re.search(r"rows read 1727, written 1724, skipped 3", text)
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+): fell", text).groups())
    assert last < first - 1.0, (first, last)
    if backend == "cpu":
        assert re.search(r"tokens/s/device .* MFU \d+\.\d+%", text)
    else:
        assert "shard), on npu:0" in text and "backend: npu" in text
    assert (tmp_path / "ckpt" / "iter_0000030").is_dir()
    from ascend_patches.versions import megatron_core_matches
    from recipes.infer import dynamic

    if megatron_core_matches(dynamic.SERVED):  # the last step serves one request (tests/test_serve.py checks its tokens)
        assert "== 6. serve stories260K" in text and "/v1/completions" in text, text[-2000:]
    else:  # says why it skips, naming the release that has the API
        assert "== 6. serve: skipped" in text and dynamic.SERVED in text, text[-2000:]
