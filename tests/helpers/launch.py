"""Launching ranks and commands for the tests: one place for torchrun's command line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures"
THIRD_PARTY = ROOT.parent / "shared" / "third_party"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pythonpath() -> str:
    """The checkout first, then whatever PYTHONPATH the suite was started with (.ci/run puts an
    older megatron-core release there to test it)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def env_for_ranks(extra=None) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def torchrun_command(script: str, *args, nproc: int = 2) -> list:
    """tests/dist/<script>.py, a module such as recipes.pretrain, or an absolute script path."""
    if script.endswith(".py"):
        target = [script if os.path.isabs(script) else str(ROOT / "tests" / "dist" / script)]
    else:
        target = ["-m", script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", *target, *map(str, args)]


def run_torchrun(script: str, *args, nproc: int = 2, timeout: int = 300, env=None, check=True, input=None,
                 cwd=None):
    """Run ``script`` under torchrun with gloo; return its stdout (the CompletedProcess with
    check=False), or fail the test with its log."""
    proc = subprocess.run(torchrun_command(script, *args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=env_for_ranks(env), cwd=cwd or ROOT, input=input)
    if not check:
        return proc
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_module(module: str, *args, timeout: int = 300, env=None, input=None):
    """``python -m module args`` in a fresh interpreter; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env_for_ranks(env), cwd=ROOT, input=input)
