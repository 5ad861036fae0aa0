"""The README's main job: preprocess the shipped sample, pretrain TP=2 over 2 CPU
processes, loss falls, patch report printed, checkpoint written."""

import os
import re
import subprocess
import sys

from conftest import ROOT, free_port


def test_demo_preprocesses_and_pretrains_with_tp2(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "recipes.demo", "--train-iters", "30", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "[ applied] flash_attention" in text and "TP=2 PP=1" in text
    assert re.search(r"rows read 1727, written 1724, skipped 3", text)
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+): fell", text).groups())
    assert last < first - 1.0, (first, last)
    assert re.search(r"tokens/s/device .* MFU \d+\.\d+%", text)
    assert (tmp_path / "ckpt" / "iter_0000030").is_dir()
