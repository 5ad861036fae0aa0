import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.launch import FIXTURES, free_port, pythonpath  # noqa: E402

EMULATION = Path(__file__).resolve().parent / "npu_emulation"


def emulated_npu_env(**extra) -> dict:
    """A command's environment on the emulated NPU device (tests/npu_emulation/README.md): the
    emulation first on PYTHONPATH, the NPU backend selected; ``extra`` on top."""
    return {"ASCEND_PATCHES_BACKEND": "npu", "PYTHONPATH": str(EMULATION) + os.pathsep + pythonpath(), **extra}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or compiling tests; `pytest -m \"not slow\"` skips them")
    config.addinivalue_line("markers", "full: a long equivalence run, skipped unless CI_FULL=1 (`CI_FULL=1 bash .ci/run`)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CI_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="full tier: a long equivalence run; CI_FULL=1 runs it")
    for item in items:
        if item.get_closest_marker("full") is not None:  # the marker, not a keyword: a test id "full" is no tier
            item.add_marker(skip)


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
    from recipes.data import preprocess_data

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
    from recipes.model import parallel

    parallel.init_distributed(tp=1, pp=1)
    yield
    parallel.destroy()


@pytest.fixture
def npu_emulated(single_process_group, monkeypatch):
    """Run the NPU code path against the plain-torch emulation of torch_npu's op contract, in
    this process, in the emulation's older mode (EMULATED_NPU_DEVICE=0: the NPU is the CPU).
    Not yet moved onto the emulated device: these tests hand the kernels CPU tensors.  The
    device's tests run in processes of their own (test_emulated_npu_device.py and the torchrun
    tests with ASCEND_PATCHES_BACKEND=npu)."""
    import ascend_patches

    monkeypatch.setenv("EMULATED_NPU_DEVICE", "0")
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


@pytest.fixture(scope="session")
def alpaca_pretrain_data(tmp_path_factory, fixtures_dir):
    """(indexed-dataset prefix, tokenizer): the Alpaca sample's responses as pretraining text in
    stories260K's 512-piece tokenizer, for the pretraining runs."""
    from recipes.data import preprocess_data

    out = tmp_path_factory.mktemp("alpaca_pretrain")
    tok = str(fixtures_dir / "stories260K" / "tokenizer.model")
    args = preprocess_data.build_parser().parse_args([
        "--input", str(fixtures_dir / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path", tok,
        "--output-prefix", str(out / "alpaca"), "--json-keys", "output", "--append-eod"])
    preprocess_data.preprocess(args)
    return str(out / "alpaca_output_document"), tok
