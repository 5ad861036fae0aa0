"""bench/chaos_resume.py as a test: the whole launch (torchrun and every rank) killed with SIGKILL
at random moments of a run with dropout on, resumed each time; the resumed run's losses equal
the uninterrupted run's bit for bit, its metrics file holds each iteration once, no process
outlives a kill and no half-written checkpoint is loaded (the script's checks; it exits 1 on
any).  Default tier: 3 kills at fixed moments (seed 0) with the distributed optimizer; full
tier: 20 kills with a drawn seed (printed), with and without it, and 3 in DeepSpeed's engine at
ZeRO-2 and ZeRO-3."""

import random
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, env_for_ranks

pytestmark = pytest.mark.slow


def _chaos(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos_resume.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env_for_ranks(), timeout=2400)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0 and "chaos: passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.full  # CI time: ~110 s; default CI keeps test_pretrain's mid-run and killed-save resumes
def test_three_kills_resume_exactly_with_the_distributed_optimizer():
    _chaos("--kills", 3, "--seed", 0, "--distributed-optimizer", "--iters", 24)


@pytest.mark.full
@pytest.mark.parametrize("layout", [[], ["--distributed-optimizer"]], ids=["tp2", "dp2_distopt"])
def test_twenty_kills_resume_exactly(layout):
    _chaos("--kills", 20, "--seed", random.SystemRandom().randrange(2 ** 31), *layout)


@pytest.mark.full
@pytest.mark.parametrize("zero", [2, 3])
def test_three_kills_resume_exactly_under_deepspeed(zero):
    _chaos("--kills", 3, "--seed", random.SystemRandom().randrange(2 ** 31), "--deepspeed-zero-stage", zero,
           "--iters", 24)
