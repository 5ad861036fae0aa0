"""The unit-test gate's comparison rules (tests/mcore_gate/run_gate.py), on outcomes written by
hand: what counts as a regression against the recorded outcomes."""

import sys

from tests.helpers.launch import ROOT

sys.path.insert(0, str(ROOT / "tests" / "mcore_gate"))
import run_gate  # noqa: E402


def test_passed_to_skipped_deselected_failed_or_missing_is_a_regression():
    expected = {f"f.py::{n}": {"outcome": "passed"} for n in ("skip", "flaky", "fail", "gone", "still")}
    expected["f.py::was_failing"] = {"outcome": "failed"}
    results = {
        "f.py::skip": {"outcome": "skipped", "why": "Skipped: needs CUDA"},
        "f.py::flaky": {"outcome": "skipped", "why": "deselected: marked flaky_in_dev upstream"},
        "f.py::fail": {"outcome": "failed", "why": "AssertionError"},
        "f.py::still": {"outcome": "passed", "why": ""},
        "f.py::was_failing": {"outcome": "passed", "why": ""},
    }
    newly_failing, newly_passing = run_gate.compare(results, expected)
    assert sorted(line.split(":")[2] for line in newly_failing) == ["fail", "flaky", "gone", "skip"], newly_failing
    assert [line.split(":")[2] for line in newly_passing] == ["was_failing"]


def test_skipped_that_was_skipped_or_failing_is_not_a_regression():
    expected = {"f.py::a": {"outcome": "skipped"}, "f.py::b": {"outcome": "failed"}}
    results = {"f.py::a": {"outcome": "skipped", "why": ""}, "f.py::b": {"outcome": "skipped", "why": ""}}
    assert run_gate.compare(results, expected) == ([], [])
