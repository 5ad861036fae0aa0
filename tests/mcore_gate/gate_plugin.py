"""pytest plugin for Megatron-Core's unit tests run as this project's gate: imports
ascend_patches first (unless GATE_MODE=none) and writes every test's outcome, with the first
line of why it did not pass, to $GATE_OUT/rank<RANK>.json.  After each test it destroys
megatron's num-microbatches calculator, as the tests' own teardown does when they pass (run_gate
lists this with its harness edits)."""

import json
import os

import pytest

if os.environ.get("GATE_MODE", "cpu") != "none":
    import ascend_patches  # noqa: F401

_results = {}


def _why(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report, "longreprtext", "") or ""
    errors = [line[2:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (errors[0] if errors else text.strip().splitlines()[-1] if text.strip() else "")[:300]


def _save():
    out = os.environ.get("GATE_OUT")
    if out:  # after every test: a session killed for time keeps what it finished
        tmp = os.path.join(out, f".rank{os.environ.get('RANK', '0')}.json")
        with open(tmp, "w") as f:
            json.dump(_results, f, indent=1)
        os.replace(tmp, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"))


def pytest_runtest_logreport(report):
    _record(report)
    _save()


def _record(report):
    nodeid = report.nodeid
    if report.when == "call":
        outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
        _results[nodeid] = {"outcome": outcome, "why": "" if report.passed else _why(report),
                            "seconds": round(report.duration, 2)}
    elif report.skipped:  # skipped in setup: skipif / importorskip
        _results[nodeid] = {"outcome": "skipped", "why": _why(report)}
    elif report.failed and (report.when == "setup" or _results.get(nodeid, {}).get("outcome") == "passed"):
        _results[nodeid] = {"outcome": "error", "why": _why(report)}


def pytest_collectreport(report):
    if report.failed:
        _results[report.nodeid + "::<collection>"] = {"outcome": "error", "why": _why(report)}
    elif report.nodeid.endswith(".py") and report.passed and not report.result:
        _results[report.nodeid + "::<no tests>"] = {"outcome": "skipped", "why": "the file defines no tests"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()


def pytest_sessionfinish(session, exitstatus):
    _save()
