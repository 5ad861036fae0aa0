"""The README's main job: preprocess the shipped sample, pretrain TP=2 over 2 CPU
processes, loss falls, patch report printed, checkpoint written."""

import re

import pytest

from tests.helpers.launch import run_torchrun

pytestmark = pytest.mark.slow  # multi-process runs


def test_demo_preprocesses_and_pretrains_with_tp2(tmp_path):
    text = run_torchrun("recipes.demo", "--train-iters", "30", "--out", tmp_path, timeout=600)
    assert re.search(r"patches: \d+ applied", text) and "TP=2 PP=1" in text
    assert re.search(r"rows read 1727, written 1724, skipped 3", text)
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+): fell", text).groups())
    assert last < first - 1.0, (first, last)
    assert re.search(r"tokens/s/device .* MFU \d+\.\d+%", text)
    assert (tmp_path / "ckpt" / "iter_0000030").is_dir()
