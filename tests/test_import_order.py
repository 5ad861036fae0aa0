"""Import order must not matter: megatron (and a module that bound targets with
`from ... import`) imported before ascend_patches, or after; both end patched, applying
twice changes nothing, revert restores the originals.  Fresh interpreters each time."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, pythonpath


@pytest.mark.parametrize("order", ["megatron_first", "patches_first"])
def test_import_order(order):
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.helpers.import_order_probe", order],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=pythonpath()))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(result["patched"].values()), result["patched"]
    assert result["idempotent"]
    assert all(result["restored"].values()), result["restored"]
    assert all(result["reapplied"].values()), result["reapplied"]
    ops = ["flash_attention", "rms_norm", "swiglu", "rope", "adamw", "collectives.reduce_scatter_tensor"]
    assert all(result["statuses"][n] == "applied" for n in ops), result["statuses"]
