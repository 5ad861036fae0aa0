"""The README's main job: TP=2 over 2 CPU processes, loss falls, patch report printed."""

import os
import re
import subprocess
import sys

from conftest import ROOT, free_port


def test_demo_trains_with_tp2():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "recipes.demo", "--steps", "30", "--log-interval", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "[ applied] flash_attention" in text and "TP=2 PP=1" in text
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+): fell", text).groups())
    assert last < first - 1.0, (first, last)
    assert re.search(r"tokens/s/device .* MFU \d+\.\d+%", text)
