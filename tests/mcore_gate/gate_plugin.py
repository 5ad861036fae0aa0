"""pytest plugin for Megatron-Core's unit tests run as this project's gate: imports
ascend_patches first (unless GATE_MODE=none) and writes every test's outcome, with the first
line of why it did not pass, to $GATE_OUT/rank<RANK>.json.  After each test it destroys
megatron's num-microbatches calculator, as the tests' own teardown does when they pass, and
the process groups the test made once megatron's model parallelism is torn down (run_gate
lists both with its harness edits)."""

import json
import os
import typing

import pytest

if os.environ.get("GATE_TYPING_OVERRIDE") == "1" and not hasattr(typing, "override"):
    # core_v0.19.0's tests import megatron.training, whose models/ use Python 3.12's
    # typing.override; PEP 698's decorator only marks the method at run time (run_gate lists this)
    def _override(method):
        try:
            method.__override__ = True
        except (AttributeError, TypeError):
            pass
        return method

    typing.override = _override

if os.environ.get("GATE_MODE", "cpu") != "none":
    import ascend_patches  # noqa: F401

_results = {}


def _why(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report, "longreprtext", "") or ""
    crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", "")
    if crash and "During handling of the above exception" in text:
        # a chained failure: the exception raised last failed the test, not the first one printed
        # (megatron's engine catches asyncio's "no running event loop" and then runs the step)
        return crash.strip().splitlines()[0][:300]
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


def _at(report) -> str:
    """The failing source line (pytest's '>' line) deepest in the traceback: where an error
    without a telling message (a None called) happened."""
    text = getattr(report, "longreprtext", "") or ""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith(">")]
    return lines[-1][:200] if lines else ""


def _record(report):
    nodeid = report.nodeid
    if report.when == "call":
        outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
        _results[nodeid] = {"outcome": outcome, "why": "" if report.passed else _why(report),
                            "at": "" if report.passed else _at(report), "seconds": round(report.duration, 2)}
    elif report.skipped:  # skipped in setup: skipif / importorskip
        _results[nodeid] = {"outcome": "skipped", "why": _why(report)}
    elif report.failed and (report.when == "setup" or _results.get(nodeid, {}).get("outcome") == "passed"):
        _results[nodeid] = {"outcome": "error", "why": _why(report), "at": _at(report)}


NOT_REPORTED = "no outcome: the session ended (ran past its time limit) before this test reported"


def pytest_collection_finish(session):
    for item in session.items:  # overwritten as each test reports; what is left was never reached
        _results.setdefault(item.nodeid, {"outcome": "error", "why": NOT_REPORTED})
    _save()


FLAKY = "deselected: marked flaky_in_dev upstream"


def pytest_deselected(items):
    for item in items:  # run_gate passes -m "not flaky_in_dev", as Megatron-LM's CI does
        if item.get_closest_marker("flaky_in_dev"):
            _results[item.nodeid] = {"outcome": "skipped", "why": FLAKY}


def pytest_collectreport(report):
    if report.failed:
        _results[report.nodeid + "::<collection>"] = {"outcome": "error", "why": _why(report)}
    elif report.nodeid.endswith(".py") and report.passed and not report.result:
        _results[report.nodeid + "::<no tests>"] = {"outcome": "skipped", "why": "the file defines no tests"}


_made_groups = []


def _tracking(new_group):
    def tracked(*args, **kwargs):
        group = new_group(*args, **kwargs)
        _made_groups.append(group)
        return group

    tracked.__wrapped__ = new_group
    return tracked


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads basetemp
def pytest_configure(config):
    import torch.distributed as dist

    dist.new_group = _tracking(dist.new_group)
    out = os.environ.get("GATE_OUT")
    if out and not config.option.basetemp:
        # the tests' tmp_path_dist_ckpt is basetemp's grandparent / "tmp_dist_ckpt", shared by
        # the ranks, and rank 0 deletes it at the end: under the default basetemp that is
        # /tmp/pytest-of-<user>/tmp_dist_ckpt for every pytest on the machine
        os.makedirs(os.path.join(out, "pytest"), exist_ok=True)
        config.option.basetemp = os.path.join(out, "pytest", f"rank{os.environ.get('RANK', '0')}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()
    if not parallel_state.model_parallel_is_initialized():
        # megatron's destroy_model_parallel drops its groups without destroying them (only its
        # gloo data-parallel ones): each test's re-initialization leaks ~60 process groups,
        # which on gloo are ~2 threads and a socket per peer each, so an 8-rank file ran with
        # ~950 threads per rank at a load of 1000 and failed on 'Connection reset by peer'
        while _made_groups:
            group = _made_groups.pop()
            if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER and dist.is_initialized():
                try:
                    dist.destroy_process_group(group)
                except (ValueError, RuntimeError):  # already destroyed (megatron's gloo groups)
                    pass


def pytest_sessionfinish(session, exitstatus):
    _save()
