"""The opt-in test mode (ASCEND_PATCHES_ANSWER_CUDA_QUERIES=1) that lets Megatron-Core's unit
tests run their CUDA-only tests here: the answers reach megatron.* and tests.* callers, and
no other module (torch's own callers must keep hearing the truth)."""

import json
import os
import subprocess
import sys

from tests.helpers.launch import ROOT, pythonpath

PROBE = r"""
import json, types, torch
import ascend_patches

def caller(name):
    mod = types.ModuleType(name)
    exec("import torch\n"
         "def ask():\n"
         "    try:\n"
         "        cap = torch.cuda.get_device_capability()\n"
         "    except Exception as e:\n"
         "        cap = type(e).__name__\n"
         "    return [torch.cuda.is_available(), torch.cuda.device_count(), cap]\n", mod.__dict__)
    return mod.ask()

print(json.dumps({n: caller(n) for n in ("megatron.core.probe", "tests.unit_tests.probe", "torch._inductor.probe",
                                          "megatronish", "user_script")}))
"""


def _answers(env_value):
    env = dict(os.environ, LOCAL_WORLD_SIZE="4", PYTHONPATH=pythonpath())
    env.pop("ASCEND_PATCHES_ANSWER_CUDA_QUERIES", None)
    if env_value is not None:
        env["ASCEND_PATCHES_ANSWER_CUDA_QUERIES"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cuda_queries_are_answered_for_megatron_and_its_tests_only():
    answers = _answers("1")
    for name in ("megatron.core.probe", "tests.unit_tests.probe"):
        assert answers[name] == [True, 4, [0, 0]], name  # one device per local rank, no CUDA architecture
    for name in ("torch._inductor.probe", "megatronish", "user_script"):
        assert answers[name][:2] == [False, 0], name  # the truth, and the real error on asking further
        assert answers[name][2] in ("RuntimeError", "AssertionError"), answers[name]


def test_cuda_queries_are_true_answers_without_the_opt_in():
    answers = _answers(None)
    assert all(a[:2] == [False, 0] for a in answers.values()), answers
