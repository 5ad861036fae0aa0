"""Megatron-Core's own unit tests (the third-party checkout's tests/unit_tests) as a gate:
the CI tier's files at 2 gloo ranks (their tests that need more in one 8-rank session), with
ascend_patches on the CPU and on the emulated NPU, every test's outcome against
tests/mcore_gate/expected.json.  A test that passed there and fails now fails this
test; one newly passing is printed, so expected.json gets tightened.  The extended tier
(minutes per file on 2 cores) runs with ``python tests/mcore_gate/run_gate.py --tier extended``."""

import sys

import pytest

from tests.helpers.launch import ROOT, THIRD_PARTY

sys.path.insert(0, str(ROOT / "tests" / "mcore_gate"))
import run_gate  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (THIRD_PARTY / "Megatron-LM" / "tests" / "unit_tests").is_dir(),
                    reason="the third-party Megatron-LM checkout is not beside the repository")
@pytest.mark.parametrize("mode", ["cpu", "npu"])
def test_megatron_core_unit_tests_hold(mode):
    results, edits = run_gate.run(mode, tier="ci", timeout_s=1200)
    files = run_gate.files_in("ci")
    newly_failing, newly_passing = run_gate.check(results, mode, files)
    print(run_gate.table(results, files))
    print(run_gate.summary(results))
    for line in newly_passing:
        print(f"NEWLY PASSING (tighten expected.json): {line}")
    assert not newly_failing, "\n".join(newly_failing)
