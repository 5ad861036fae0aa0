"""Megatron-Core's own unit tests (the third-party checkout's tests/unit_tests) as a gate:
the CI tier's files at 2 gloo ranks (their tests that need more in one 8-rank session), with
ascend_patches on the CPU and on the emulated NPU, every test's outcome against
tests/mcore_gate/expected.json.  A test that passed there and fails now fails this
test; one newly passing is printed, so expected.json gets tightened.  The extended tier
(minutes per file on 2 cores) runs with ``python tests/mcore_gate/run_gate.py --tier extended``."""

import sys

import pytest

from tests.helpers.launch import ROOT

sys.path.insert(0, str(ROOT / "tests" / "mcore_gate"))
import run_gate  # noqa: E402

pytestmark = pytest.mark.slow


def _tree() -> str:
    """The Megatron-LM tree whose tests fit the installed megatron-core (.ci/run's 0.19.2 job
    puts that release first on PYTHONPATH)."""
    import importlib.metadata as md

    minor = ".".join(md.version("megatron-core").split(".")[:2])
    return {"0.16": "core_v0.16.1", "0.19": "core_v0.19.0"}.get(minor, "")


@pytest.mark.skipif(not _tree(), reason="no Megatron-LM tree's tests here for the installed megatron-core's minor")
# npu: the emulated NPU (tests/npu_emulation), its files at 2 ranks, ~2.5 min here; their 5 tests that build
# 8-rank groups (wide_tests: two 8-rank torchrun sessions) are in the full tier.  cpu on Python 3.11 is in the
# full tier (~3 min): default CI's Python 3.12 job runs the cpu gate whole and the npu one narrow, with
# core_v0.19.0's tests, which hold Megatron-Core's inference tests too (~5 and ~7 min there)
@pytest.mark.parametrize("mode,which", [
    pytest.param("cpu", "all", marks=pytest.mark.full if sys.version_info < (3, 12) else ()),
    ("npu", "narrow"), pytest.param("npu", "wide", marks=pytest.mark.full)])
def test_megatron_core_unit_tests_hold(mode, which):
    tree = _tree()
    if not (run_gate.TREES[tree][0] / "unit_tests").is_dir():
        pytest.skip(f"the third-party Megatron-LM {tree} checkout is not beside the repository")
    results, edits = run_gate.run(mode, tier="ci", timeout_s=1200, tree=tree, which=which)
    files = run_gate.files_in("ci")
    newly_failing, newly_passing = run_gate.check(results, mode, files, which)
    print(run_gate.table(results, files))
    print(run_gate.summary(results))
    for line in newly_passing:
        print(f"NEWLY PASSING (tighten expected.json): {line}")
    assert not newly_failing, "\n".join(newly_failing)
