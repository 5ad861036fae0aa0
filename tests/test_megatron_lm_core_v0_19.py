"""Stock Megatron-LM core_v0.19.0 (``shared/third_party/Megatron-LM-core_v0.19.0``) with one
added line, ``import ascend_patches``, on megatron-core 0.19.x (.ci/run's 0.19.2 job puts it
first on PYTHONPATH): its example training loop at 2 ranks.  Its ``pretrain_gpt.py`` needs
megatron/training, which needs Python >= 3.12 (``typing.override``); .ci/run says whether
this machine has one."""

import importlib.metadata as md
import shutil

import pytest

from tests.helpers import megatron_lm as mlm
from tests.helpers.launch import THIRD_PARTY, env_for_ranks, run_torchrun

TREE = THIRD_PARTY / "Megatron-LM-core_v0.19.0"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not md.version("megatron-core").startswith("0.19."),
                       reason="core_v0.19.0's scripts run on megatron-core 0.19.x (.ci/run's 0.19.2 job)"),
    pytest.mark.skipif(not TREE.is_dir(), reason="the core_v0.19.0 checkout is not beside the repository"),
]


def test_simple_mcore_train_loop_example_core_v0_19(tmp_path):
    """The example as shipped, plus the import as its first line; megatron.core is the installed
    0.19 release (the checkout's own core differs from PyPI's 0.19.2 in five files)."""
    script = tmp_path / "run_simple_mcore_train_loop.py"
    shutil.copy(TREE / "examples" / "run_simple_mcore_train_loop.py", script)
    mlm.add_import(script, "first")
    proc = run_torchrun(str(script), nproc=2, cwd=tmp_path, env={"PYTHONPATH": env_for_ranks()["PYTHONPATH"]},
                        timeout=300)
    assert proc.count("Iteration 4:") == 2 and "Successfully loaded the model" in proc
