"""`python -m ascend_patches`, configuration errors and version warnings."""

import os
import re
import subprocess
import sys

import pytest

import ascend_patches
from ascend_patches import versions
from tests.helpers.launch import ROOT


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-W", "ignore", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_module_report_lists_every_patch():
    out = _run("-m", "ascend_patches", "--all")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "backend: cpu" in text and "megatron-core 0.16" in text
    for name, patch in ascend_patches.REGISTRY.patches.items():
        line = next((l for l in text.splitlines() if f"] {name} " in l), None)
        assert line is not None, f"patch {name} missing from the report"
        # Megatron-LM's training package and DeepSpeed are not imported here: their patches wait
        waits = patch.group == "megatron_lm" or patch.after is not None
        states = ("[ applied]", "[ skipped]", "[ pending]") if waits else ("[ applied]", "[ skipped]")
        assert any(s in line for s in states), line
    assert "[ skipped] device.rng_get_npu" in text and "not for backend cpu" in text


def test_short_report_and_json():
    import json

    out = _run("-m", "ascend_patches")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("ascend_patches ") and "backend cpu" in lines[0] and len(lines) < 30
    # patches not applied for one reason share a line: the NPU's, skipped on the CPU backend
    assert "applied" in lines[2] and "skipped  device.rng_get_npu, device.rng_set_npu, npu.module._FLOAT_TYPES" in \
        out.stdout and re.search(r"skipped  device\.rng_get_npu, [^:]*: not for backend cpu", out.stdout)
    data = json.loads(_run("-m", "ascend_patches", "--json").stdout)
    assert data["backend"] == "cpu" and data["patches"]["flash_attention"]["state"] == "applied"
    assert set(data["patches"]) == set(ascend_patches.REGISTRY.patches)


def test_env_disable_and_unknown_name():
    out = _run("-m", "ascend_patches", "--all", env={"ASCEND_PATCHES_DISABLE": "rope,swiglu"})
    assert out.returncode == 0, out.stderr
    assert "[ skipped] rope" in out.stdout and "disabled by configuration" in out.stdout
    assert "[ applied] flash_attention" in out.stdout
    bad = _run("-c", "import ascend_patches", env={"ASCEND_PATCHES_DISABLE": "ropee"})
    assert bad.returncode == 2 and "cannot disable unknown patch(es) ['ropee']: did you mean rope?" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1  # one line
    with pytest.raises(ValueError, match="unknown patch"):
        ascend_patches.configure(disable=["no_such_patch"])


def test_unsupported_backend_is_an_error():
    out = _run("-c", "import ascend_patches", env={"ASCEND_PATCHES_BACKEND": "tpu"})
    assert out.returncode != 0 and "ASCEND_PATCHES_BACKEND='tpu'" in out.stderr
    out = _run("-c", "import ascend_patches", env={"ASCEND_PATCHES_BACKEND": "npu"})
    assert out.returncode != 0 and "torch_npu is not installed" in out.stderr


def test_compile_ops_is_cpu_only_and_reported():
    out = _run("-m", "ascend_patches", env={"ASCEND_PATCHES_COMPILE_OPS": "1"})
    assert out.returncode == 0 and "compile_ops: on" in out.stdout, out.stderr
    from ascend_patches.settings import check_compile_ops

    with pytest.raises(ValueError, match="compile_ops covers the CPU backend only"):
        check_compile_ops("npu", True)  # configure() and the env path both call it


def test_megatron_version_outside_range_warns(monkeypatch):
    monkeypatch.setattr(versions, "version_of", lambda d: "0.20.0" if d == "megatron-core" else "1.0")
    with pytest.warns(UserWarning, match=r"megatron-core 0.20.0 is outside the range .*>=0.12.0,<0.20.0"):
        note = versions.check_megatron_version()
    assert "0.20.0" in note
    assert all(versions.megatron_in_tested_range(v) for v in ("0.12.0", "0.16.1", "0.17.1", "0.19.2"))
    assert not versions.megatron_in_tested_range("0.11.0") and not versions.megatron_in_tested_range("0.20.0")


def test_renamed_upstream_target_fails_loudly_naming_target_and_versions():
    code = (
        "import megatron.core.transformer.mlp as mlp\n"
        "del mlp.MLP.forward\n"  # as if renamed in a new release
        "import ascend_patches\n"
    )
    out = _run("-c", code)
    assert out.returncode != 0
    assert "megatron.core.transformer.mlp:MLP.forward" in out.stderr and "megatron-core 0.16" in out.stderr


def test_cpu_heap_keeps_freed_pages_mapped():
    """keep_freed_memory: a big block freed and allocated again, step after step, reuses pages
    already mapped (no page faults), where glibc's default mmap/munmap faults every page in again.  Run in a
    fresh interpreter each way, since the setting is process-wide."""
    code = (
        "import resource, sys, torch\n"
        "from ascend_patches.device import cpu_heap\n"
        "if sys.argv[1] == 'keep': print(cpu_heap.keep_freed_memory(), file=sys.stderr)\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        # 64 MiB touched and freed, as a step's temporaries are; the heap settles after a few
        # rounds (torch's aligned blocks reuse a freed one once neighbours have coalesced)
        "for _ in range(12): torch.ones(64 << 20, dtype=torch.uint8)\n"
        "f0 = faults()\n"
        "for _ in range(3): torch.ones(64 << 20, dtype=torch.uint8)\n"
        "print((faults() - f0) // 3)\n"
    )
    pages = (64 << 20) // 4096
    counts = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = int(proc.stdout.split()[-1])
        if mode == "keep":
            assert "kept in the heap" in proc.stderr
    assert counts["default"] > pages // 2  # this platform's malloc maps a fresh block each time
    assert counts["keep"] < pages // 20, counts


def test_tensor_memory_counts_weights_gradients_and_adam_state():
    """--log-tensor-memory's figure: a 1M-element fp32 weight with its gradient and AdamW's two
    moments add 4 x 4 MiB (the step counters are scalars); a view adds nothing."""
    import gc

    import torch

    from recipes.train import throughput

    gc.collect()
    before = throughput.tensor_memory_gib()
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    view = p.detach()[:10]  # noqa: F841  (shares the weight's storage)
    gc.collect()
    added = (throughput.tensor_memory_gib() - before) * 2 ** 30
    assert abs(added - 4 * 4 * 2 ** 20) < 64 * 1024, added


def test_installed_but_broken_torch_npu_is_an_error_not_the_cpu(tmp_path):
    """A torch_npu whose import fails as CANN's missing libraries make it fail: importing
    ascend_patches stops with one line naming the failure and both ways out; asked for the CPU
    on purpose, it runs there and never imports torch_npu."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n')
    path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = _run("-c", "import ascend_patches", env=path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    line = out.stderr.strip()
    assert "torch_npu is installed but its import failed (ImportError: libhccl.so" in line
    assert "set_env.sh" in line and "ASCEND_PATCHES_BACKEND=cpu" in line
    on_purpose = _run("-c", "import sys, ascend_patches; print(ascend_patches.settings().backend, "
                            "'torch_npu' in sys.modules)", env={**path, "ASCEND_PATCHES_BACKEND": "cpu"})
    assert on_purpose.returncode == 0 and on_purpose.stdout.split() == ["cpu", "False"], on_purpose.stderr


@pytest.mark.parametrize("name,dtype,tf32,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.5),  # the SXM part's reported name
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H100 NVL", "fp16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.5),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),  # float32 on the CUDA cores (torch's default)
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),  # float32 matmuls as TF32
    ("NVIDIA B200", "bf16", False, 2250.0),
    ("Ascend910B1", "bf16", False, 373.88),
    ("Ascend910B3", "bf16", False, 294.912),
    ("Ascend910_9392", "bf16", False, 353.8944),
    ("NVIDIA GB200", "bf16", False, None),  # no cited figure: n/a, never B200's
    ("Ascend910B2C", "bf16", False, None),  # a variant not in the table is not Ascend910B2
    ("Ascend910B2", "fp16", False, None),  # a dtype without a cited figure
    ("NVIDIA L40S", "bf16", False, None),
])
def test_mfu_peak_per_chip_and_dtype(name, dtype, tf32, want):
    """docs/mfu_peaks.md's figures, by the device name torch reports and the trained dtype;
    a chip or dtype it does not cite gives no peak and a reason, never another chip's."""
    import torch

    from recipes.train import throughput

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    peak, why = throughput.published_peak(name, dt, allow_tf32=tf32)
    assert peak == want, (name, dtype, why)
    if want is None:
        assert "pass --peak-tflops" in why and "docs/mfu_peaks.md" in why
        from recipes.model import llama2

        meter = throughput.Meter(llama2.shape("llama2-tiny"), 512, peak, 1)
        assert meter.step(throughput.Work(1000, 1000, 1000 * 64))["mfu"] is None
