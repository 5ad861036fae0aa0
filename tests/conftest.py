import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
EMULATION = Path(__file__).resolve().parent / "npu_emulation"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def stories_sft(tmp_path_factory, fixtures_dir):
    """stories260K converted to Megatron (``base``) and the Alpaca sample as instruction data
    (``sft``) in its tokenizer: the fine-tuning tests' starting point."""
    from converters import hf_to_megatron
    from recipes import preprocess_data

    root = tmp_path_factory.mktemp("stories_sft")
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir",
                         str(root / "base")])
    preprocess_data.preprocess(preprocess_data.build_parser().parse_args([
        "--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
        str(fixtures_dir / "stories260K"), "--output-prefix", str(root / "sft"),
        "--handler-name", "GeneralInstructionHandler", "--seq-length", "256", "--workers", "1"]))
    return root


@pytest.fixture(scope="session")
def single_process_group():
    """A one-rank gloo group and megatron parallel state at TP=PP=1."""
    os.environ["MASTER_PORT"] = str(free_port())
    from recipes import parallel

    parallel.init_distributed(tp=1, pp=1)
    yield
    parallel.destroy()


@pytest.fixture
def npu_emulated(single_process_group):
    """Run the NPU code path against the plain-torch emulation of torch_npu's op contract."""
    import ascend_patches

    sys.path.insert(0, str(EMULATION))
    import torch_npu  # the emulation

    assert getattr(torch_npu, "EMULATED", False)
    for k in torch_npu.calls:
        torch_npu.calls[k] = 0
    before = ascend_patches.settings()
    ascend_patches.configure(backend="npu", disable=before.disabled)
    try:
        yield torch_npu
    finally:
        import torch_npu.contrib.transfer_to_npu as t2n

        ascend_patches.revert()
        t2n.undo()
        for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
            del sys.modules[name]
        sys.path.remove(str(EMULATION))
        ascend_patches.configure(backend="cpu", disable=before.disabled)


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300, env=None, check=True):
    """Run tests/dist/<script>.py, or a module such as recipes.pretrain, under torchrun with
    gloo; return its stdout (the CompletedProcess with check=False), fail with its log."""
    target = [str(ROOT / "tests" / "dist" / script)] if script.endswith(".py") else ["-m", script]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *target, *map(str, args)]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if not check:
        return proc
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout
